"""Mixed precision and torch.compile for training, applied from the outside of the model.

`trainer.precision=bf16|fp16` runs the forward pass under torch.autocast (matrix products and the
GRUs in the lower precision, reductions and the loss in float32); the weights, the gradients and
the optimizer stay float32. fp16's narrow range needs a gradient scaler: the loss is multiplied
by a large factor before backward so that small gradients do not flush to zero, the gradients are
divided by it again before clipping, and a step whose scaled gradients overflowed is skipped while
the factor is halved. bf16 has float32's range and needs no scaler.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nmt.errors import NMTError

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def has_bf16_matmul(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run on fast kernels here.

    On a CPU, oneDNN has bf16 kernels only with AVX-512 (native with AVX512-BF16 or AMX); on an
    AVX2-only CPU (AMD Zen 3, for one) bf16 falls back to slow reference code (README, "Mixed
    precision"). On a GPU, torch.cuda.is_bf16_supported() decides.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to say, so trust the user's choice
        return True


# Row counts that products in bf16 or fp16 on a CPU come in multiples of. torch runs those products on oneDNN, which
# generates a kernel for every new shape and keeps it in a cache (of 1,024 by default): 1 to 20 ms a shape on the
# 2-vCPU AMX host, against 0.4 ms for running a (200, 512) x (512, 1536) product once made. Training batches differ
# in their numbers of sentences and tokens, so shapes that depend on them were new at almost every step: 130 ms of
# a 650 ms bf16 step of the reference model. Rounded up, they recur: a step's products (one row per sentence) to
# a multiple of 32, a batch's (one row per token, thousands) to a multiple of 128, which keeps their shapes few
# enough for the cache.
ONEDNN_ROWS = 32
ONEDNN_TOKEN_ROWS = 128


def row_quantum(tensor: torch.Tensor, tokens: bool = False) -> int:
    """The multiple to round the varying row count of products over `tensor` up to: ONEDNN_ROWS, or with `tokens`
    (a row per token of the batch) ONEDNN_TOKEN_ROWS, where oneDNN runs them (bf16 or fp16 on a CPU, the tensor's
    own dtype or autocast's); 1 elsewhere (MKL's fp32 products and CUDA's make no kernel per shape)."""
    if tensor.device.type != "cpu":
        return 1
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else tensor.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return 1
    return ONEDNN_TOKEN_ROWS if tokens else ONEDNN_ROWS


def round_up(count: int, quantum: int) -> int:
    return -(-count // quantum) * quantum


def pad_rows(x: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """x with zero rows appended along `dim` up to `rows` of them; x itself when it has as many."""
    extra = rows - x.size(dim)
    if not extra:
        return x
    widths = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, extra]  # F.pad lists the last dimension first
    return F.pad(x, widths)


def with_padded_rows(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """function(x) for a function of each row alone (a linear layer), with x's rows (all dimensions but the last)
    padded with zeros to a multiple of row_quantum(x, tokens=True) first (bf16 on a CPU), so that its product and
    its gradients' products have shapes seen before. The padding's outputs are dropped, so its gradients are zero."""
    rows = x.numel() // x.size(-1)
    padded = round_up(rows, row_quantum(x, tokens=True))
    if padded == rows:
        return function(x)
    out = function(pad_rows(x.reshape(rows, x.size(-1)), padded))
    return out[:rows].view(*x.shape[:-1], out.size(-1))


def extended_rows(buffer: torch.Tensor, start: int, count: int, quantum: int) -> torch.Tensor:
    """Rows start:start + count of `buffer` (along its second-to-last dimension), their number rounded up to a
    multiple of `quantum`, for a product whose shape should be one seen before (row_quantum): the buffer's own
    next rows where it has them (whatever they hold: a product's rows are independent of each other, and the
    caller keeps only the first `count` of the result), else a zero-padded copy."""
    rows = round_up(count, quantum)
    if start + rows <= buffer.size(-2):
        return buffer[..., start:start + rows, :]
    return pad_rows(buffer[..., start:, :], rows, dim=-2)


_WARNED: set[str] = set()  # the keys cpu_bf16_fallback has warned about


def cpu_bf16_fallback(key: str, device: torch.device) -> bool:
    """True, with a warning naming `key`, when bf16 was asked for on a CPU without fast bf16 kernels:
    the caller then runs fp32, which is many times faster there than emulated bf16."""
    if device.type != "cpu" or has_bf16_matmul(device):
        return False
    if key not in _WARNED:  # once per key: nmt-translate decodes every line on its own
        _WARNED.add(key)
        log.warning("%s=bf16: this CPU (%s) has no bfloat16 matrix kernels (they need AVX-512 or AMX), and "
                    "emulated bf16 is tens of times slower than fp32, so fp32 is used instead. Set %s=fp32 to "
                    "say so and silence this warning.", key, torch.backends.cpu.get_cpu_capability(), key)
    return True


def decode_precision(cfg, device: torch.device) -> str:
    """What decoding with `cfg` (a DecodeConfig) runs in on `device`: its precision, except fp32 (with the
    fallback's warning) for bf16 on a CPU without bf16 kernels."""
    bf16 = cfg.precision == "bf16" and not cpu_bf16_fallback(f"{cfg.PREFIX}precision", device)
    return "bf16" if bf16 else "fp32"


class Precision:
    """What `trainer.precision` means on one device: an autocast context and, for fp16, a GradScaler."""

    def __init__(self, name: str, device: torch.device):
        if name == "bf16" and cpu_bf16_fallback("trainer.precision", device):
            name = "fp32"
        self.name = name
        self.dtype = DTYPES[name]
        self.device_type = device.type
        if self.dtype is not None and device.type not in ("cpu", "cuda"):
            raise NMTError(f"trainer.precision={name} needs a CPU or CUDA device, not {device}; use trainer.precision=fp32.")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NMTError(f"trainer.precision=bf16: the GPU {torch.cuda.get_device_name(device)} has no bfloat16 "
                           f"support; use trainer.precision=fp16 or fp32.")
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        if name == "fp16" and device.type == "cpu":
            log.warning("trainer.precision=fp16 on the CPU works but is slow (most CPUs have no fp16 arithmetic); "
                        "bf16 is the CPU's mixed precision")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before clipping); no-op without a scaler."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


FP32 = Precision("fp32", torch.device("cpu"))


def compile_decoder_step(model: nn.Module, compiler: Callable = torch.compile) -> bool:
    """torch.compile the decoder's per-token step (attention + GRU gates), which a multi-layer decoder runs
    T times per batch.

    The step is where the time goes on short batches: many small kernels that compilation fuses.
    Compiling the whole forward would unroll its Python loop over target positions and recompile
    for every new target length. Returns False, with a warning, when compilation is unavailable or
    the decoder has one layer; a failure at the first call falls back to eager there (see `_with_fallback`).
    """
    decoder = model.decoder
    if decoder.num_layers == 1:  # Decoder.forward runs the fused recurrence, the search runs search_step
        log.warning("trainer.compile=true: a one-layer decoder trains through its fused recurrence "
                    "(nmt/model/recurrence.py) and decodes through its search step, neither of which runs the "
                    "compiled step; nothing was compiled, running eagerly (model.decoder_layers=2 or more uses it)")
        return False
    step = decoder._advance
    try:
        compiled = compiler(step, dynamic=True)
    except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
        log.warning("trainer.compile=true: torch.compile is unavailable (%s); running eagerly", _first_line(error))
        return False
    decoder._advance = _with_fallback(compiled, step)
    return True


def _with_fallback(compiled: Callable, eager: Callable) -> Callable:
    """Call `compiled`; if compiling fails (no compiler, unsupported op), warn once and use `eager` from then on."""
    state = {"fn": compiled, "checked": False}

    def call(*args, **kwargs):
        if state["checked"]:
            return state["fn"](*args, **kwargs)
        try:
            out = state["fn"](*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - compile errors come in many types
            log.warning("trainer.compile=true: compiling the decoder step failed (%s); running eagerly",
                        _first_line(error))
            state["fn"] = eager
            out = eager(*args, **kwargs)
        state["checked"] = True
        return out

    return call


def _first_line(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0][:200]
