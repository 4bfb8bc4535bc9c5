"""Where and how reproducibly to run: device choice and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from nmt.errors import NMTError


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto = CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NMTError(f"{key}={name} but CUDA is not available here; use {key}=auto or cpu.")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
