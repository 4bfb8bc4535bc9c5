"""train(cfg): read the data, build the model, and run the loop: clip, schedule, validate, checkpoint, stop.

Under torchrun the same loop runs on every rank (see nmt.distributed): each rank trains on its own
share of the epoch's batches, DistributedDataParallel averages the gradients, and rank 0 alone
validates and writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import sacrebleu
import torch
from tqdm import tqdm

from nmt import distributed
from nmt.checkpoint import average_states, load_checkpoint, load_latest, save_checkpoint
from nmt.config import DecodeConfig, TrainConfig
from nmt.console import kept_records, log_records_to_file, log_to_file, setup_logging
from nmt.cpuload import CpuLoad, OtherCpuUse, take_entry_probe
from nmt.data.batching import Batch, EncodedCorpus, collate, epoch_batches, padding_share
from nmt.data.cache import cache_root
from nmt.data.pipeline import TrainingData, prepare_training_data
from nmt.data.sampling import SegmentationSampler, load_segmentation, save_segmentation
from nmt.data.vocab import PAD_ID, SPECIAL_IDS
from nmt.decoding import translate_sentences
from nmt.distributed import SINGLE_PROCESS, Distributed, advance, rank_batches, wrap_model
from nmt.ema import WeightAverage
from nmt.errors import ConfigError, Diverged, Interrupted
from nmt.model.drift import EmbeddingDrift
from nmt.model.seq2seq import Seq2Seq, build_model
from nmt.model.vectors import check_vectors_exist, load_pretrained_, training_words
from nmt.optim import build_adam, clip_grad_norm, unfreeze_embeddings
from nmt.plots import plot_embedding_drift, plot_training_curves
from nmt.precision import FP32, Precision, compile_decoder_step
from nmt.run import RunFiles, absolute_data_paths, check_resumable, make_directory, write_config
from nmt.runtime import keep_freed_memory, pick_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that a resumed run must restore."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch`'s list already trained on, by all ranks together
    elapsed: float = 0.0  # training seconds, summed over resumes (for trainer.max_time)
    best_metric: float | None = None
    bad_validations: int = 0  # validations since the best one (early stopping)
    skipped_steps: int = 0  # updates skipped for a NaN or infinite loss or gradient
    skipped_in_row: int = 0
    overflow_steps: int = 0  # fp16 steps the gradient scaler skipped while lowering its scale
    world_size: int = 1  # processes that trained the last stretch (a resume may use another number)
    stop_reason: str = ""


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("outputs") / cfg.name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


# --- model and optimiser -----------------------------------------------------------------------------

FROZEN_COVERAGE = 0.9  # a frozen table whose vectors cover fewer of the training tokens is pointed out


def setup_embeddings(model: Seq2Seq, cfg: TrainConfig, data: TrainingData, load_vectors: bool = True) -> None:
    """Load pretrained vectors (logging coverage; not when resuming: the checkpoint has the weights) and
    freeze the chosen sides."""
    emb = cfg.model.embeddings
    for side, path in (("src", emb.src_vectors), ("tgt", emb.tgt_vectors)):
        if not load_vectors or path is None or (side == "tgt" and cfg.model.tie_src_tgt and path == emb.src_vectors):
            continue  # (tied: the one shared matrix is loaded already)
        module = model.src_embed if side == "src" else model.tgt_embed
        pieces = [data.vocab.side(side).id_to_piece(i) for i in range(data.vocab.size(side))]
        words = None
        if emb.vectors_subword_mean:
            words = training_words(getattr(data.train, f"{side}_flat"), getattr(data.train, f"{side}_offsets"),
                                   pieces, SPECIAL_IDS)
        coverage = load_pretrained_(module.weight, pieces, Path(path), SPECIAL_IDS, data.token_counts(side),
                                    fmt=emb.vectors_format, lowercase=emb.vectors_lowercase, words=words)
        log.info("coverage: %s", coverage.line(side, Path(path)))
        uncovered = 1 - coverage.token_share if coverage.token_share is not None else 0.0
        if emb.freeze in (side, "both") and uncovered > 1 - FROZEN_COVERAGE and not emb.unfreeze_after:
            log.warning("model.embeddings.freeze=%s: %.1f%% of the %s training tokens are pieces without a vector, "
                        "whose rows stay at their random initial values for the whole run. Use vectors that match "
                        "the vocabulary (scripts/train_vectors.py, or model.embeddings.vectors_lowercase / "
                        "vectors_subword_mean), set model.embeddings.unfreeze_after, or leave this side trainable.",
                        emb.freeze, 100 * uncovered, side)
    if emb.freeze in ("src", "both"):
        model.src_embed.weight.requires_grad_(False)
    if emb.freeze in ("tgt", "both"):
        model.tgt_embed.weight.requires_grad_(False)


def build_optimizer(model: Seq2Seq, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Frozen parameters are left out, so they have no optimizer state and no weight decay.
    return build_adam(model, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.model.embeddings.sparse,
                      decoupled=cfg.optim.name == "adamw", no_decay=tuple(cfg.optim.no_decay))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    optim = cfg.optim
    if optim.scheduler == "plateau":
        mode = "max" if cfg.trainer.early_stopping_metric == "bleu" else "min"
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=optim.factor,
                                                          patience=optim.patience, min_lr=optim.min_lr)
    if optim.scheduler == "inverse_sqrt":
        warmup = optim.warmup_steps
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1))))
    if optim.scheduler in ("linear", "cosine"):
        return BudgetSchedule(optimizer, optim.scheduler, optim.lr, optim.min_lr, optim.warmup_steps,
                              optim.cycle_from, optim.cycle_floor)
    return None


class BudgetSchedule:
    """optim.scheduler=linear|cosine: after `warmup_steps` of linear warmup, the learning rate falls from
    `lr` to `min_lr` as training uses up its budget (whichever of trainer.max_steps, max_time and
    max_epochs ends it first). The trainer measures that progress after every step and calls `update`.

    Tied to trainer.max_time, the fall ends when the time does, on a fast machine or a slow one: the
    schedule that suits a fixed time budget (Li, Yumer and Ramanan 2020, "Budgeted training", found a
    linear fall to zero the best of those they tried). The state is the optimizer's learning rate and the
    trainer's progress, both in the checkpoint, so there is nothing of its own to save.

    With `cycle_from`, once that share of the budget is used every epoch is one cycle: it starts at the
    fall's rate and ends at `cycle_floor` times it, so each end-of-epoch checkpoint is taken at a low rate
    and the next epoch climbs away from it again (the cyclical schedule of stochastic weight averaging,
    Izmailov et al. 2018, for trainer.average_last).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shape: str, lr: float, min_lr: float, warmup_steps: int,
                 cycle_from: float | None = None, cycle_floor: float = 0.1):
        self.optimizer, self.shape, self.lr, self.min_lr, self.warmup_steps = optimizer, shape, lr, min_lr, warmup_steps
        self.cycle_from, self.cycle_floor = cycle_from, cycle_floor
        self.update(0, 0.0)

    def rate(self, step: int, progress: float, in_epoch: float = 0.0) -> float:
        """The learning rate for update `step + 1`, with `progress` (0..1) of the budget used and that update
        `in_epoch` of the way through its epoch (0 for the first batch, 1 for the last)."""
        progress = min(1.0, max(0.0, progress))
        fall = 1.0 - progress if self.shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        cycle = 1.0
        if self.cycle_from is not None and progress >= self.cycle_from:
            cycle = 1.0 - (1.0 - self.cycle_floor) * min(1.0, max(0.0, in_epoch))
        return warmup * cycle * (self.min_lr + (self.lr - self.min_lr) * fall)

    def update(self, step: int, progress: float, in_epoch: float = 0.0) -> None:
        rate = self.rate(step, progress, in_epoch)
        for group in self.optimizer.param_groups:  # groups added by unfreezing included
            group["lr"] = rate

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# --- one step and validation -----------------------------------------------------------------------

def batch_loss(model: torch.nn.Module, batch: Batch, label_smoothing: float = 0.0,
               precision: Precision = FP32) -> torch.Tensor:
    """Summed cross-entropy of a batch under teacher forcing, over its real target positions only (float32)."""
    tgt_mask = batch.tgt_out != PAD_ID  # (B, T)
    with precision.autocast():
        return model(batch.src_ids, batch.src_lens, batch.tgt_in, tgt_mask, batch.tgt_out[tgt_mask], label_smoothing)


@dataclass
class StepResult:
    loss: float  # mean loss per target token, over every rank's batch
    tokens: int  # target tokens, over every rank's batch
    status: str  # ok | nonfinite (update skipped) | overflow (fp16: the scaler skipped it and lowered its scale)

    @property
    def updated(self) -> bool:
        return self.status == "ok"


def train_step(model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               device: torch.device, dist: Distributed = SINGLE_PROCESS, precision: Precision = FP32) -> StepResult:
    """Forward, backward, clip and update on one batch (on the CPU; moved to `device` here).

    `model` may be DistributedDataParallel, which averages the gradients over ranks. Scaling each
    rank's summed loss by world_size / (target tokens on all ranks) makes that average the gradient
    of the mean loss per token of all ranks' batches together, as if one process had trained on
    their union. A NaN or infinite loss or gradient on any rank skips the update on every rank.
    """
    tokens = int(dist.sum([batch.num_tgt_tokens])[0])  # counted on the CPU copy: no device sync
    batch = batch.to(device)
    loss_sum = batch_loss(model, batch, cfg.optim.label_smoothing, precision)
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss_sum * dist.world_size / tokens)
    precision.unscale_(optimizer)
    max_norm = cfg.optim.clip_grad_norm if cfg.optim.clip_grad_norm > 0 else float("inf")
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm)
    local_loss = float(loss_sum.detach())
    loss_total, bad_losses = dist.sum([local_loss, 0.0 if math.isfinite(local_loss) else 1.0])
    result = StepResult(loss_total / tokens, tokens, "ok")
    grad_finite = math.isfinite(float(grad_norm))  # the same on every rank: DDP made the gradients equal
    scaler = precision.scaler
    if bad_losses or (scaler is None and not grad_finite):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update(scaler.get_scale())  # end the scaler's iteration; a NaN loss is not its doing
        result.status = "nonfinite"
        return result
    if scaler is None:
        optimizer.step()
        return result
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the update itself when a gradient is inf or NaN
    scaler.update()  # ... and then halves the scale
    if not grad_finite:
        optimizer.zero_grad(set_to_none=True)
        # With a scale above 1 the overflow is the scaler's probe of its range: routine. At a scale
        # of 1 or less the gradients are not finite at their true size: a real failure.
        result.status = "overflow" if scale > 1.0 else "nonfinite"
    return result


@torch.no_grad()
def validate(model: Seq2Seq, data: TrainingData, cfg: TrainConfig, device: torch.device,
             precision: Precision = FP32) -> dict[str, float]:
    """Dev loss and perplexity under teacher forcing, and dev BLEU of the decoded dev set (both in the training precision)."""
    model.eval()
    corpus, total_loss, total_tokens = data.val_encoded, 0.0, 0
    usable = [i for i in range(len(corpus)) if len(corpus.src(i)) and len(corpus.tgt(i))]
    for start in tqdm(range(0, len(usable), 64), desc="validate", unit="batch", leave=False):
        batch = collate(corpus, usable[start:start + 64]).to(device)
        total_loss += float(batch_loss(model, batch, precision=precision))
        total_tokens += batch.num_tgt_tokens
    decode_cfg = DecodeConfig(beam_size=cfg.trainer.val_beam_size, alpha=0.0 if cfg.trainer.val_beam_size == 1 else 1.0,
                              max_len_ratio=cfg.trainer.val_max_len_ratio, batch_size=64)
    with precision.autocast():
        translations = translate_sentences(model, data.vocab, data.val.src, decode_cfg, device, progress=True)
    hypotheses = [t.text for t in translations]
    bleu = sacrebleu.corpus_bleu(hypotheses, [data.val.tgt]).score
    model.train()
    loss = total_loss / max(1, total_tokens)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bleu": bleu, "example": hypotheses[0]}


# --- checkpoints --------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """This process's random state: the CPU generator and, on a GPU, that device's."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def checkpoint_state(model, optimizer, scheduler, state: TrainState, cfg_dict: dict,
                     rank_rng: list[dict] | None = None, scaler: dict | None = None) -> dict:
    """The checkpoint dict; `model` is the plain model (never the DDP wrapper), so its keys load anywhere."""
    return {
        "model": getattr(model, "module", model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "ranks": rank_rng or []},  # under torchrun: every rank's state, in rank order
        "scaler": scaler or {},
        "train_state": asdict(state),
        "config": cfg_dict,
    }


def restore(checkpoint: dict, model, optimizer, scheduler, dist: Distributed = SINGLE_PROCESS) -> TrainState:
    # under trainer.ema_decay, last.pt's "model" is the moving average and the weights that train on are apart
    model.load_state_dict(checkpoint.get("training_model", checkpoint["model"]))
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:  # the checkpoint's parameters fall into other groups than this run's
        mismatch = ConfigError(
            f"Cannot resume: the optimizer state in the checkpoint does not fit this run's parameter groups "
            f"({error}). optim.no_decay, or optim.weight_decay from zero to non-zero or back, differs from the "
            f"run's own settings: resume with those in the run's config.yaml, or start a new run in another "
            f"paths.run_dir."
        )
        mismatch.every_rank = True  # every rank loads the same checkpoint
        raise mismatch from None
    if scheduler is not None and checkpoint["scheduler"]:
        scheduler.load_state_dict(checkpoint["scheduler"])
    rng = checkpoint["rng"]
    ranks = rng.get("ranks") or []
    if dist.enabled and len(ranks) == dist.world_size:  # the same ranks again: each takes back its own state
        torch.set_rng_state(ranks[dist.rank]["torch"])
        if ranks[dist.rank]["cuda"] is not None and dist.device.type == "cuda":
            torch.cuda.set_rng_state(ranks[dist.rank]["cuda"], dist.device)
    else:  # otherwise every rank starts from rank 0's (or the single process's) state
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(**checkpoint["train_state"])


# --- the loop -----------------------------------------------------------------------------------------

# what both warnings about a CPU shared with another process advise
SHARED_CPU_ADVICE = ("Run one at a time, or give each fewer threads (trainer.num_threads=1, or OMP_NUM_THREADS=1 in the "
                     "environment of another command); see the README, Troubleshooting")


class SlowdownWatch:
    """Notices a training that has become several times slower than it was earlier in the run.

    On a CPU shared with another process that also uses every core, torch's OpenMP threads spin while
    they wait for one another, and the two processes slow each other ten to a hundred times (README,
    "Troubleshooting"). The trainer gives `add` the target tokens and the seconds spent in training
    steps (validation excluded) of every `trainer.log_every` steps. Once an interval runs at under
    1/`factor` of the fastest interval before it, `add` returns the warning, once per run.
    """

    def __init__(self, factor: float = 4.0):
        self.factor, self.fastest, self.warned = factor, 0.0, False

    def add(self, tokens: int, seconds: float) -> str | None:
        if tokens <= 0 or seconds <= 0:  # nothing measured
            return None
        speed = tokens / seconds
        if not self.warned and speed * self.factor < self.fastest:
            self.warned = True
            return (f"training has slowed to {speed:,.0f} target tokens/s, under 1/{self.factor:g} of the "
                    f"{self.fastest:,.0f} it reached earlier in this run. Another process is probably using the same "
                    f"CPU cores: two processes that each use every core slow each other ten to a hundred times. "
                    f"{SHARED_CPU_ADVICE}")
        self.fastest = max(self.fastest, speed)
        return None


def busy_cpu_warning(load: CpuLoad | None, threads: int) -> str | None:
    """The warning for a run that starts on CPUs other processes are using, or None.

    `load` is `OtherCpuUse.measure()` over the run's start: from the command's start (or the trainer's creation)
    to the first batch. It warns when other processes kept at least 3/4 of a core busy on average over half a
    second or more, and the run's threads and that work together exceed the cores by more than half a core: the
    case of a second training beside a first, which `SlowdownWatch` cannot see in the process started second.
    One thread on one core has no team of threads to spin.
    """
    if load is None or load.seconds < 0.5 or load.others < 0.75 or threads + load.others <= load.cores + 0.5:
        return None
    if threads == load.cores == 1:
        return None
    plural = lambda n, word: f"{n} {word}" + ("s" if n != 1 else "")  # noqa: E731
    return (f"while this run started, other processes kept about {load.others:.1f} of the "
            f"{plural(load.cores, 'CPU core')} it may use busy, and it trains with {plural(threads, 'thread')}. "
            "If one of them is another training, or any program using torch on every core, both will run many "
            f"times slower than alone: torch's OpenMP threads spin while they wait for one another. {SHARED_CPU_ADVICE}")


class Trainer:
    """Holds what the loop needs; `run` reads top to bottom."""

    def __init__(self, cfg: TrainConfig, cfg_dict: dict, files: RunFiles, dist: Distributed | None = None,
                 resuming: bool = False):
        self.created = time.monotonic()
        # other processes' use of our CPUs from the command's start (or from here) to the first batch
        self.cpu_use = take_entry_probe() or OtherCpuUse()
        self.cfg, self.cfg_dict, self.files = cfg, cfg_dict, files
        self.dist = dist or Distributed(device=pick_device(cfg.trainer.device))
        self.device = self.dist.device
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
        # rank 0 trains the vocabulary and writes the corpus cache; the other ranks then read both
        with self.dist.main_first():
            # a fresh run replaces SentencePiece models left in its directory by a start that failed
            self.data = prepare_training_data(cfg.data, Path(cfg.paths.data_dir), files.run_dir, cfg.trainer.seed,
                                              cache_root(cfg.paths.cache_dir, files.run_dir), self.dist.is_main,
                                              reuse_run_vocab=resuming or not self.dist.is_main)
        # under data.subword_alpha rank 0 segments the training text anew each epoch (epoch_corpus)
        self.sampler = (SegmentationSampler(self.data.train, self.data.vocab, cfg.data)
                        if cfg.data.subword_alpha and self.dist.is_main else None)
        self.model = build_model(cfg.model, self.data.vocab.size("src"), self.data.vocab.size("tgt"))
        setup_embeddings(self.model, cfg, self.data, load_vectors=not resuming)
        after, max_steps = cfg.model.embeddings.unfreeze_after, cfg.trainer.max_steps
        if after and max_steps and after >= max_steps:
            log.warning("model.embeddings.unfreeze_after=%d is not below trainer.max_steps=%d: the frozen embeddings "
                        "(model.embeddings.freeze=%s) will stay frozen for the whole run", after, max_steps,
                        cfg.model.embeddings.freeze)
        self.model.to(self.device)
        self.ema = WeightAverage(self.model, cfg.trainer.ema_decay)  # a no-op when the decay is 0
        compiled = cfg.trainer.compile and compile_decoder_step(self.model)
        self.train_model = wrap_model(self.model, self.dist)  # what the steps call: DDP under torchrun
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.precision = Precision(cfg.trainer.precision, self.device)
        self.state = TrainState(world_size=self.dist.world_size)
        self.drift = EmbeddingDrift(files.checkpoint("step0"),
                                    {side: self.data.token_counts(side) for side in ("src", "tgt")},
                                    shared=cfg.model.tie_src_tgt)
        self.epoch_size = 0  # batches in the current epoch
        self.interrupted = 0  # the signal that asked us (or, under torchrun, any rank) to stop, if any
        self.signalled = False  # whether this process itself received SIGINT or SIGTERM
        self.first_batch_seen = False
        self.slowdown = SlowdownWatch() if self.device.type == "cpu" else None
        self.step_tokens, self.step_seconds = 0, 0.0  # the training steps' own, since the last log line
        self.resumable_epochs: list[int] = []  # the epochs of last.pt and of the one it replaced
        params = sum(p.numel() for p in self.model.parameters())
        ranks = f", {self.dist.world_size} processes (DDP)" if self.dist.enabled else ""
        log.info("model: %s parameters, device %s%s, precision %s%s%s", f"{params:,}", self.device, ranks,
                 self.precision.name, ", decoder step compiled" if compiled else "",
                 f", weights averaged as they train (trainer.ema_decay={self.ema.decay:g})" if self.ema.enabled else "")

    def save(self, name: str) -> None:
        """Every rank calls this (each hands in its random state); rank 0 writes the file."""
        rank_rng = self.dist.gather(rng_state(self.device)) if self.dist.enabled else None
        if not self.dist.is_main:
            return
        state = checkpoint_state(self.model, self.optimizer, self.scheduler, self.state, self.cfg_dict, rank_rng,
                                 self.precision.state_dict())
        if name == "last" and self.ema.enabled:  # called outside ema.applied(): the model holds its training weights
            state["training_model"], state["model"] = state["model"], self.ema.state_dict(self.model)
        save_checkpoint(state, self.files.checkpoint(name), keep_previous=name == "last")
        if name == "last" and self.cfg.data.subword_alpha:
            self.drop_old_segmentations()

    def epoch_corpus(self) -> EncodedCorpus:
        """The training pairs as this epoch segments them: the cache's, or under data.subword_alpha a
        sample that rank 0 draws once per epoch into the run directory, where the other ranks, and a
        run resumed in this epoch, read it (SentencePiece's draws differ between processes)."""
        if not self.cfg.data.subword_alpha:
            return self.data.train
        path = self.files.segmentation(self.state.epoch)
        with self.dist.main_first():
            if self.dist.is_main and not path.exists():
                save_segmentation(self.sampler.epoch(self.cfg.trainer.seed, self.state.epoch), path)
            elif self.dist.is_main:
                log.info("epoch %d: the training pieces sampled for it before are in %s", self.state.epoch + 1, path)
        return load_segmentation(path)

    def drop_old_segmentations(self) -> None:
        """Keep the epochs' pieces that last.pt and the last.pt it replaced may resume into."""
        self.resumable_epochs = [*self.resumable_epochs[-1:], self.state.epoch]
        oldest = self.files.segmentation(min(self.resumable_epochs)).name
        for path in self.files.segmentations():
            if path.name < oldest:  # the names sort by epoch
                path.unlink()

    def keep_validation_weights(self, keep: int) -> None:
        """checkpoints/val-STEP.pt (the model alone) for this validation; only the newest `keep` stay."""
        path = self.files.checkpoint(f"val-{self.state.step:08d}")
        save_checkpoint({"model": self.model.state_dict(), "step": self.state.step, "config": self.cfg_dict,
                         "budget_used": self.budget_used(self.cfg.trainer.max_seconds)}, path)
        kept = self.files.validation_checkpoints()
        for old in kept[:-keep]:
            old.unlink()

    def resume(self) -> None:
        # on the CPU first: RNG states must stay there; load_state_dict moves the rest to the model's device
        checkpoint, path = load_latest(self.files.checkpoint("last"), map_location="cpu")
        self.unfreeze_if_due(checkpoint["train_state"]["step"])  # so the optimizer has the groups it saved
        self.state = restore(checkpoint, self.model, self.optimizer, self.scheduler, self.dist)
        if self.ema.enabled and "training_model" in checkpoint:
            self.ema.load_state_dict(checkpoint["model"])
        elif self.ema.enabled:
            self.ema.restart()
            log.info("trainer.ema_decay: %s holds no moving average, so it starts from the resumed weights", path)
        self.resumable_epochs = [self.state.epoch]
        self.precision.load_state_dict(checkpoint.get("scaler", {}))
        self.state.stop_reason = ""  # limits are checked again against the (possibly new) settings
        if self.dist.is_main:
            drop_metrics_after(self.files.metrics, self.state.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch + 1, self.state.batch_in_epoch)
        if self.state.world_size != self.dist.world_size:
            log.info("the run continues on %d process(es) instead of %d: the epoch goes on at its batch %d, "
                     "which no process has trained on yet", self.dist.world_size, self.state.world_size,
                     self.state.batch_in_epoch)
        self.state.world_size = self.dist.world_size

    def log_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.files.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def on_signal(self, signum, frame) -> None:
        if self.signalled and signum == signal.SIGINT:  # a second Ctrl-C: stop at once; last.pt on disk still stands
            raise KeyboardInterrupt
        if self.signalled:  # SIGTERM again: a cluster manager and torchrun may both send one; already stopping
            return
        self.signalled = True
        self.interrupted = signum
        log.warning("%s: stopping after this step and saving checkpoints/last.pt "
                    "(press Ctrl-C again to quit at once)", signal.Signals(signum).name)

    def run(self, resuming: bool) -> TrainState:
        handlers = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run(resuming)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _run(self, resuming: bool) -> TrainState:
        cfg = self.cfg.trainer
        if resuming:
            self.resume()
        else:
            drop_metrics_after(self.files.metrics, 0)  # a start killed before its first checkpoint left some
            self.save("step0")  # the initial weights, to compare embeddings before and after
        max_seconds = cfg.max_seconds
        if resuming:  # a run that had reached trainer.max_steps or max_time takes no further step
            self.state.stop_reason = self.limit_reached(max_seconds)
        started = time.monotonic() - self.state.elapsed
        while self.state.epoch < cfg.max_epochs and not self.state.stop_reason:
            self.train_epoch(started, max_seconds)
        self.state.stop_reason = self.state.stop_reason or f"trainer.max_epochs={cfg.max_epochs} reached"
        if self.interrupted:
            self.save("last")
            raise Interrupted(
                f"Training stopped by {signal.Signals(self.interrupted).name} at step {self.state.step}; "
                f"{self.files.checkpoint('last')} is saved. Resume with: {resume_command(self.files.run_dir)}",
                self.interrupted,
            )
        if cfg.average_last:
            self.average_last_validations(cfg.average_last)
        best = "none" if self.state.best_metric is None else f"{self.state.best_metric:.4g}"
        log.info("training stopped: %s; best dev %s %s; run directory %s", self.state.stop_reason,
                 cfg.early_stopping_metric, best, self.files.run_dir)
        after = self.cfg.model.embeddings.unfreeze_after
        if after and self.state.step < after:
            log.warning("the embeddings stayed frozen for the whole run: model.embeddings.unfreeze_after=%d was not "
                        "reached in %d updates", after, self.state.step)
        return self.state

    def train_epoch(self, started: float, max_seconds: float | None) -> None:
        cfg, state, dist = self.cfg.trainer, self.state, self.dist
        corpus = self.epoch_corpus()
        batches = epoch_batches(corpus, self.cfg.data.batch_tokens, self.cfg.data.sort_pool, cfg.seed, state.epoch)
        self.epoch_size = len(batches)
        if state.batch_in_epoch == 0:
            log.info("epoch %d: %d batches, %.1f%% padding", state.epoch + 1, len(batches),
                     100 * padding_share(corpus, batches))
        mine = rank_batches(len(batches), state.batch_in_epoch, dist.rank, dist.world_size)  # this rank's share
        bar = tqdm(total=len(batches), initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}", unit="batch",
                   dynamic_ncols=True, disable=not dist.is_main)
        window_tokens, window_start, loss_sum, loss_count = 0, time.monotonic(), 0.0, 0
        self.train_model.train()
        end_of_epoch, step_in_epoch = False, 0
        while not end_of_epoch and not state.stop_reason:
            step_start = time.monotonic()
            batch = collate(corpus, batches[mine[step_in_epoch]])
            step_in_epoch += 1
            self.log_first_batch()
            result = train_step(self.train_model, batch, self.optimizer, self.cfg, self.device, dist, self.precision)
            self.step_tokens += result.tokens
            self.step_seconds += time.monotonic() - step_start
            self.count_nonfinite(result)
            state.step += 1
            if result.updated:
                self.ema.update(state.step)
            position = state.batch_in_epoch
            state.batch_in_epoch = advance(position, len(batches), dist.world_size)
            state.elapsed = time.monotonic() - started
            self.unfreeze_if_due(state.step)
            window_tokens += result.tokens
            loss_sum, loss_count = loss_sum + result.loss, loss_count + 1
            speed = window_tokens / max(1e-9, time.monotonic() - window_start)
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{speed:.0f}", lr=f"{self.lr:.2e}", refresh=False)
            bar.update(state.batch_in_epoch - position)
            if state.step % cfg.log_every == 0:
                self.log_metrics({"kind": "train", "step": state.step, "epoch": state.epoch + 1,
                                  "loss": loss_sum / loss_count, "lr": self.lr, "tgt_tokens_per_s": speed,
                                  "elapsed": state.elapsed})
                loss_sum, loss_count = 0.0, 0
                self.watch_speed()
            state.stop_reason = self.limit_reached(max_seconds)
            end_of_epoch = state.batch_in_epoch == len(batches)
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            self.schedule_next_update(max_seconds)
            if self.interrupted:
                state.stop_reason = "interrupted"
                break  # run() saves last.pt; validating now would keep the user waiting
            due = state.step % cfg.validate_every == 0 if cfg.validate_every else end_of_epoch
            if due or state.stop_reason or state.epoch >= cfg.max_epochs:
                self.validate_and_checkpoint()
        bar.close()

    def watch_speed(self) -> None:
        warning = self.slowdown and self.slowdown.add(self.step_tokens, self.step_seconds)
        if warning:
            log.warning(warning)
        self.step_tokens, self.step_seconds = 0, 0.0

    def log_first_batch(self) -> None:
        if not self.first_batch_seen:
            self.first_batch_seen = True
            log.info("first batch ready %.2f s after the trainer started (data preparation included)",
                     time.monotonic() - self.created)
            if self.device.type == "cpu" and not self.dist.enabled:  # torchrun's ranks share the cores by design
                warning = busy_cpu_warning(self.cpu_use.measure(), torch.get_num_threads())
                if warning:
                    log.warning(warning)

    def count_nonfinite(self, result: StepResult) -> None:
        state, limit = self.state, self.cfg.trainer.max_nonfinite_steps
        if result.status == "ok":
            state.skipped_in_row = 0
            return
        if result.status == "overflow":  # routine for fp16: the scaler found its range; not a failure
            state.overflow_steps += 1
            log.debug("step %d: fp16 gradients overflowed; update skipped, loss scale lowered to %g",
                      state.step + 1, self.precision.scaler.get_scale())
            return
        state.skipped_steps += 1
        state.skipped_in_row += 1
        log.warning("step %d: loss or gradient is not finite (loss %s); update skipped (%d in a row, %d in all)",
                    state.step + 1, result.loss, state.skipped_in_row, state.skipped_steps)
        if state.skipped_in_row >= limit:
            precision = (f" or a wider trainer.precision (bf16 or fp32 instead of {self.cfg.trainer.precision})"
                         if self.cfg.trainer.precision == "fp16" else "")
            raise Diverged(
                f"Training stopped: {limit} updates in a row had a NaN or infinite loss or gradient "
                f"(trainer.max_nonfinite_steps={limit}). The checkpoints in {self.files.run_dir / 'checkpoints'} "
                f"are untouched. Try a lower learning rate (optim.lr={self.cfg.optim.lr:g} now) or a smaller "
                f"optim.clip_grad_norm{precision}, then resume with trainer.resume=true or start a new run."
            )

    def unfreeze_if_due(self, step: int) -> None:
        """model.embeddings.unfreeze_after=N: the frozen embeddings join the optimizer after update N."""
        after = self.cfg.model.embeddings.unfreeze_after
        if after and step >= after and unfreeze_embeddings(self.model, self.optimizer, self.scheduler,
                                                           tuple(self.cfg.optim.no_decay)):
            log.info("step %d: embeddings unfrozen (model.embeddings.unfreeze_after=%d)", step, after)

    def schedule_next_update(self, max_seconds: float | None) -> None:
        """Set the learning rate of the next update. optim.scheduler=plateau moves at validation instead."""
        if isinstance(self.scheduler, BudgetSchedule):
            # the next update's batch, as a share of the epoch: 0 for its first batch, 1 for its last
            in_epoch = self.state.batch_in_epoch / max(1, self.epoch_size - 1)
            self.scheduler.update(self.state.step, self.budget_used(max_seconds), in_epoch)
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # inverse_sqrt
            self.scheduler.step()

    def budget_used(self, max_seconds: float | None) -> float:
        """The share (0..1) of the training budget used: the largest of the shares of trainer.max_epochs,
        max_steps and max_time, as whichever of them is nearest its end stops training."""
        cfg, state = self.cfg.trainer, self.state
        shares = [(state.epoch + state.batch_in_epoch / self.epoch_size) / cfg.max_epochs]
        if cfg.max_steps:
            shares.append(state.step / cfg.max_steps)
        if max_seconds is not None:
            shares.append(state.elapsed / max_seconds)
        return min(1.0, max(shares))

    def limit_reached(self, max_seconds: float | None) -> str:
        """Why to stop after this step, or "". Every rank gets the same answer (and learns of a signal
        that reached another rank), so all stop at the same step. The ranks also agree on the elapsed
        time (the longest of theirs), which a time-budget learning-rate schedule reads."""
        cfg, state = self.cfg.trainer, self.state
        signum, state.elapsed = self.dist.max([float(self.interrupted), state.elapsed])
        time_up = max_seconds is not None and state.elapsed >= max_seconds
        self.interrupted = int(signum)
        if cfg.max_steps and state.step >= cfg.max_steps:
            return f"trainer.max_steps={cfg.max_steps} reached"
        if time_up:
            return f"trainer.max_time={cfg.max_time} reached"
        return ""

    def improves(self, value: float) -> bool:
        """Whether a dev score beats the best so far by more than trainer.min_delta."""
        cfg, best = self.cfg.trainer, self.state.best_metric
        sign = 1.0 if cfg.early_stopping_metric == "bleu" else -1.0
        return best is None or sign * (value - best) > cfg.min_delta

    def average_last_validations(self, count: int) -> None:
        """checkpoints/averaged.pt: the mean weights of the last `count` validations (of those made once
        trainer.average_from of the training budget was used), validated like the others; it becomes
        best.pt if it scores better. Rank 0 averages and validates, the others wait."""
        kept = self.files.validation_checkpoints()[-count:]
        metrics = self.dist.broadcast(self.validate_average(kept) if self.dist.is_main else None)
        if metrics is None:
            return
        value = metrics[self.cfg.trainer.early_stopping_metric]
        improved = self.improves(value)
        log.info("averaged the weights of the last %d validations (steps %s to %s) into %s: dev loss %.3f, "
                 "ppl %.2f, BLEU %.2f%s", metrics["averaged"], metrics["first_step"], metrics["last_step"],
                 self.files.checkpoint("averaged"), metrics["loss"], metrics["ppl"], metrics["bleu"],
                 "; better than the best validation, so it is now best.pt" if improved else
                 "; best.pt stays, its dev score is better")
        self.log_metrics({"kind": "averaged", "step": self.state.step, "best": improved,
                          **{k: v for k, v in metrics.items() if k != "example"}})
        if improved:
            self.state.best_metric = value
            self.save("best")  # on rank 0 the model now holds the average

    def validate_average(self, kept: list[Path]) -> dict | None:
        """Rank 0: average `kept` (those made after trainer.average_from) into checkpoints/averaged.pt, load
        it into the model, validate it."""
        since = self.cfg.trainer.average_from
        # a checkpoint kept before the budget was recorded counts as late enough
        loaded = [(path, state) for path in kept
                  if (state := load_checkpoint(path)).get("budget_used", 1.0) >= since]
        if not loaded:
            log.warning("trainer.average_last: no validation weights were kept%s, so there is nothing to average",
                        f" after trainer.average_from={since:g} of the budget" if since else "")
            return None
        averaged = average_states([state for _, state in loaded], [path.name for path, _ in loaded])
        save_checkpoint(averaged, self.files.checkpoint("averaged"))
        self.model.load_state_dict(averaged["model"])
        metrics = validate(self.model, self.data, self.cfg, self.device, self.precision)
        steps = averaged["averaged_steps"]
        return {**metrics, "averaged": len(steps), "first_step": steps[0], "last_step": steps[-1]}

    def validate_and_checkpoint(self) -> None:
        # under trainer.ema_decay the validation, the drift, best.pt and val-STEP.pt see the moving average
        with self.ema.applied():
            self.validate_and_keep()
        self.save("last")  # last: written after best, so a resume never lacks a best checkpoint
        if self.dist.is_main:
            plot_training_curves(self.files.metrics, self.files.run_dir / "training_curves.png")

    def validate_and_keep(self) -> None:
        """Validate, log, and write best.pt and val-STEP.pt when due."""
        cfg, state = self.cfg.trainer, self.state
        # rank 0 validates while the others wait; all then take the same decisions (best, patience, lr)
        metrics = self.dist.broadcast(
            validate(self.model, self.data, self.cfg, self.device, self.precision) if self.dist.is_main else None)
        value = metrics[cfg.early_stopping_metric]
        improved = self.improves(value)
        if improved:
            state.best_metric, state.bad_validations = value, 0
        else:
            state.bad_validations += 1
            if cfg.patience and state.bad_validations >= cfg.patience and not state.stop_reason:
                state.stop_reason = f"no dev {cfg.early_stopping_metric} improvement in {cfg.patience} validations"
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        epoch = state.epoch if state.batch_in_epoch == 0 else state.epoch + state.batch_in_epoch / self.epoch_size
        log.info("step %d, epoch %.2f: dev loss %.3f, ppl %.2f, BLEU %.2f, lr %.2e%s | %s", state.step, epoch,
                 metrics["loss"], metrics["ppl"], metrics["bleu"], self.lr, " (best)" if improved else "",
                 metrics["example"][:80])
        self.log_metrics({"kind": "val", "step": state.step, "epoch": round(epoch, 4), "lr": self.lr,
                          "elapsed": state.elapsed, **{k: v for k, v in metrics.items() if k != "example"}})
        if self.dist.is_main:  # step0.pt is rank 0's to read, as metrics.jsonl is its to write
            self.log_metrics(self.drift.measure(self.model, state.step))
            plot_embedding_drift(self.files.metrics, self.files.run_dir / "embedding_drift.png")
        if improved:
            self.save("best")
        if cfg.keep_checkpoints and self.dist.is_main:
            self.keep_validation_weights(cfg.keep_checkpoints)


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget metrics logged after the checkpoint we resume from: those steps run again."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same overrides, the run directory, resume=true."""
    keep = [a for a in sys.argv[1:] if not a.startswith(("paths.run_dir=", "trainer.resume="))]
    tail = [*keep, f"paths.run_dir={run_dir}", "trainer.resume=true"]
    if distributed.launched_by_torchrun():  # any number of processes may continue it
        processes = os.environ.get("LOCAL_WORLD_SIZE", "1")
        return shlex.join(["torchrun", "--standalone", f"--nproc_per_node={processes}", sys.argv[0], *tail])
    return shlex.join(["nmt-train", *tail])


def train(cfg: TrainConfig, cfg_dict: dict) -> Path:
    """Train as configured; returns the run directory. Under torchrun, every rank calls this."""
    if not (cfg.trainer.resume and cfg.paths.run_dir and RunFiles(Path(cfg.paths.run_dir)).has_checkpoint()):
        # before minutes of data work; a resume takes the weights from its checkpoint and reads no vectors
        check_vectors_exist(cfg.model.embeddings.src_vectors, cfg.model.embeddings.tgt_vectors)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()  # process-wide, before the first large allocation
    with distributed.session(cfg.trainer.device, cfg.trainer.dist_timeout_seconds) as dist:
        # a function of its own, so that its Trainer, whose DDP wrapper holds the process group, is gone before
        # the session destroys the group, and not left to interpreter exit, where gloo's threads can abort it
        return train_in_session(cfg, cfg_dict, dist)


def train_in_session(cfg: TrainConfig, cfg_dict: dict, dist: Distributed) -> Path:
    # rank 0's choice, so that a default (timestamped) directory is the same on every rank
    run_dir = dist.broadcast(Path(cfg.paths.run_dir) if cfg.paths.run_dir else default_run_dir(cfg))
    files = RunFiles(run_dir)
    # rank 0 alone logs (to the console until the run's log file is open); the others report only errors
    setup_logging(None, level=logging.INFO if dist.is_main else logging.ERROR)
    cfg_dict["data"] = absolute_data_paths(cfg_dict["data"])
    with kept_records() as said:  # e.g. "nothing to resume yet": the run's log should have it too
        resuming = check_resumable(files, cfg.trainer.resume, cfg_dict)
    if dist.is_main:
        make_directory(run_dir, "paths.run_dir")
        setup_logging(files.log)
        # each start of the run begins its part of the log with the command (a failed start leaves its own)
        log_to_file(f"started in {Path.cwd()}: {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}", logging.INFO)
        log_records_to_file(said)
    cfg_dict["paths"]["run_dir"] = str(run_dir)
    # absolute, so nmt-evaluate finds the data from any working directory (data_dir=... overrides it)
    cfg_dict["paths"]["data_dir"] = str(Path(cfg.paths.data_dir).resolve())
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    trainer = Trainer(cfg, cfg_dict, files, dist, resuming)
    if dist.is_main:
        write_config(files, cfg_dict)  # only once the data is ready, so a failed start leaves no "run" behind
    trainer.run(resuming)
    return run_dir
