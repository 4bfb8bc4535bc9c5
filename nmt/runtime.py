"""Where and how reproducibly to run: device choice, seeding, how freed memory is kept, and whether other
processes are using the CPUs."""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

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


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of returning it to the system.

    By default glibc serves each large block (above a threshold that grows to at most 32 MB: a batch's
    logits, the decoder's saved attention activations) as a fresh mapping from the kernel, whose
    every page faults and is zeroed on first touch, at every training step. Kept in the heap, the
    next step reuses pages that are already mapped. On our 2-vCPU AVX2 machine the reference model's
    minor page faults per training step fell from 90,000-150,000 to about 10,000 (none once the heap
    had reached its size), and a step took about 4% less time (docs/speed.md). Resident memory
    stays near its peak between steps, a peak that every step reaches anyway. Process-wide; a no-op
    (False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's own symbol: musl's mallopt ignores these settings
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class CpuLoad(NamedTuple):
    others: float  # the CPUs' worth that other processes kept busy, on average
    seconds: float  # over how long
    cores: int  # the CPUs this process may run on


def busy_ticks(stat: str, cpus: list[int]) -> int | None:
    """The busy time of the listed CPUs in the text of /proc/stat, in clock ticks: user, nice, system, irq and
    softirq (guest time is counted in user; idle, iowait and the hypervisor's steal are not busy). None unless
    every listed CPU has its line."""
    wanted, busy, found = {f"cpu{i}" for i in cpus}, 0, 0
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted and len(fields) >= 8:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
            busy, found = busy + user + nice + system + irq + softirq, found + 1
    return busy if wanted and found == len(wanted) else None


def cpu_quota() -> float | None:
    """The CPUs' worth of time that a container's CPU quota allows (cgroup v2 cpu.max, v1 cpu.cfs_quota_us), or
    None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (Path(f"/sys/fs/cgroup/cpu/cpu.cfs_{name}_us").read_text().strip()
                             for name in ("quota", "period"))
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


class OtherCpuUse:
    """How busy other processes kept the CPUs that this process may run on, from creation to `measure`.

    Linux's /proc/stat counts each CPU's busy time (`busy_ticks`) for every process together; this process's
    own CPU time, its threads' and that of the children it has waited for, is subtracted. `measure` returns
    None where there is no /proc/stat or no CPU affinity (macOS, Windows), and under a container's CPU quota
    below its CPUs, where /proc/stat's CPUs are shared with other containers.
    """

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        quota = cpu_quota() if self.cpus else None
        if quota is not None and quota < len(self.cpus):
            self.cpus = []
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        """(monotonic seconds, busy CPU seconds of our CPUs, this process's CPU seconds), or None."""
        try:
            ticks = busy_ticks(Path("/proc/stat").read_text(), self.cpus) if self.cpus else None
        except OSError:
            return None
        if ticks is None:
            return None
        return time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])

    def measure(self) -> CpuLoad | None:
        """Other processes' use of our CPUs since creation."""
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        seconds = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return CpuLoad(max(0.0, others) / seconds, seconds, len(self.cpus))
