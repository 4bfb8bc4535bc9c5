"""Other processes' use of the CPUs this process may run on, from Linux's /proc/stat.

Two trainings on the same cores slow each other many times over (torch's OpenMP threads spin while they
wait for one another), and the one started second has no faster speed of its own to compare with. nmt-train
therefore starts an `OtherCpuUse` as the command starts (`start_at_entry`, in nmt.cli, before hydra and
torch load, which lengthens the time measured over), and the trainer reads it at its first batch
(`take_entry_probe`). Standard library only, so that nmt.cli stays free of torch until the config is
composed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple


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
        try:
            self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        except OSError:
            self.cpus = []
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


_entry_probe: OtherCpuUse | None = None


def start_at_entry() -> None:
    """Start measuring now, for the trainer's first batch (`take_entry_probe`)."""
    global _entry_probe
    _entry_probe = OtherCpuUse()


def take_entry_probe() -> OtherCpuUse | None:
    """The measurement begun by `start_at_entry`, once: later calls, and a training that was not started from the
    command (a library call, a test), get None and begin their own."""
    global _entry_probe
    probe, _entry_probe = _entry_probe, None
    return probe
