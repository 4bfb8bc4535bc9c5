"""Data-parallel training under torchrun: the process group, each rank's share of an epoch, and the
few collectives the trainer needs.

torchrun starts one process per device and tells each its place in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Every rank builds the same epoch batch list
from (seed, epoch) and trains on its own share of it; DistributedDataParallel averages the
gradients. Decisions that skip or end work (a NaN step, a signal, the time limit, early stopping)
are reduced across ranks so that every rank takes them at the same step: a rank that stopped alone
would leave the others waiting in a collective. Rank 0 alone writes files.

Without torchrun (or with one process) everything here is a no-op and training is unchanged.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nmt.errors import NMTError
from nmt.runtime import pick_device

log = logging.getLogger(__name__)


class PeerFailed(NMTError):
    """Another rank failed first and said why; this rank stops without repeating the message."""

    every_rank = True


@dataclass(frozen=True)
class Distributed:
    """This process's place among the ranks; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- collectives (each is a no-op for a single process) ----------------------------------------------

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks."""
        return self._reduce(values, torch_dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over ranks (a flag set on any rank is set on all)."""
        return self._reduce(values, torch_dist.ReduceOp.MAX)

    def barrier(self) -> None:
        self.sum([0.0])  # an all-reduce on the rank's own device works for gloo and NCCL alike

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (say, to write a cache); the others wait, then run it (and read it).

        If rank 0 fails, the others raise PeerFailed instead of waiting forever.
        """
        if not self.enabled:
            yield
            return
        if not self.is_main:
            (failed,) = self.max([0.0])
            if failed:
                raise PeerFailed("rank 0 failed while preparing; see its message.")
            yield
            return
        try:
            yield
        except BaseException:
            self.max([1.0])
            raise
        self.max([0.0])


SINGLE_PROCESS = Distributed()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of one rank: cuda:LOCAL_RANK when CUDA is asked for (or auto and present), else the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise NMTError(f"trainer.device={name} names one GPU, but under torchrun each process uses cuda:LOCAL_RANK; "
                       f"set trainer.device=cuda (or auto).")
    if name == "mps":
        raise NMTError("trainer.device=mps cannot be used with torchrun; use cuda or cpu.")
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise NMTError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu.")
    if local_rank >= torch.cuda.device_count():
        raise NMTError(f"torchrun started a process with LOCAL_RANK={local_rank}, but this node has only "
                       f"{torch.cuda.device_count()} GPU(s); set --nproc_per_node to at most that.")
    return torch.device("cuda", local_rank)


def setup(device_name: str, timeout_seconds: float) -> Distributed:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU), or describe a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if world_size == 1:
        return Distributed(device=pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = rank_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                      timeout=timedelta(seconds=timeout_seconds),
                                      device_id=device if device.type == "cuda" else None)
    return Distributed(rank, world_size, local_rank, device)


def teardown(dist: Distributed, clean_exit: bool) -> None:
    """Leave the process group; after a clean or agreed exit, first wait so that no rank quits while
    rank 0 still writes (torchrun stops every rank as soon as one exits with an error)."""
    if not dist.enabled or not torch_dist.is_initialized():
        return
    if clean_exit:
        dist.barrier()
    gc.collect()  # a model wrapped in DDP that only a reference cycle keeps alive would hold the group past this
    torch_dist.destroy_process_group()


@contextmanager
def session(device_name: str, timeout_seconds: float) -> Iterator[Distributed]:
    """setup() ... teardown(): the process group lives as long as the block."""
    dist = setup(device_name, timeout_seconds)
    clean = False
    try:
        yield dist
        clean = True
    except NMTError as error:
        clean = error.every_rank and not isinstance(error, PeerFailed)  # a failed rank 0 writes nothing more
        raise
    finally:
        teardown(dist, clean)


DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def wrap_model(model: nn.Module, dist: Distributed) -> nn.Module:
    """DistributedDataParallel around `model` under torchrun (it averages gradients); `model` itself otherwise.

    Checkpoints keep saving `model`, so their keys never gain DDP's `module.` prefix.
    """
    if not dist.enabled:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    # no buffer sync before each forward: torch 2.13 renamed broadcast_buffers (a FutureWarning on every rank)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in DDP_PARAMETERS else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **{no_sync: False})


# --- each rank's share of an epoch ------------------------------------------------------------------------

def rank_batches(num_batches: int, start: int, rank: int, world_size: int) -> list[int]:
    """Which of the epoch's batches this rank trains on, in order, from global position `start`.

    The batches not yet consumed are dealt round-robin: at each step rank r takes batch
    start + step * world_size + r. When they do not divide evenly, the last step is filled with
    batches from the epoch's start, so every rank makes the same number of steps and none waits
    at the end of the epoch. `start` counts batches of the whole epoch list, so a run resumed with
    another number of ranks continues at the first batch nobody has trained on.
    """
    remaining = num_batches - start
    steps = -(-remaining // world_size)  # ceil
    padded = [start + i if start + i < num_batches else (start + i - num_batches) % num_batches
              for i in range(steps * world_size)]
    return padded[rank::world_size]


def advance(position: int, num_batches: int, world_size: int) -> int:
    """The global position in the epoch after one step of all ranks."""
    return min(num_batches, position + world_size)
