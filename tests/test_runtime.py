"""keep_freed_memory: a large block freed and allocated again reuses its pages instead of faulting them afresh."""

import ctypes
import subprocess
import sys
import textwrap

import pytest

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# A 64 MB tensor is allocated, written and freed, over and over, as a training step's logits are; the
# minor page faults of the last round are printed. (glibc's heap grows for the first few rounds, because
# torch asks for aligned memory, a little more than the freed block, and then reuses what it has.)
SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from nmt.runtime import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES = 64 * 2**20 // 4096


def last_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    kept, faults = last_round_faults("keep")
    assert kept == "True"
    assert faults < PAGES // 10, f"{faults} page faults on reusing a freed 64 MB block"


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_without_it_a_large_block_faults_afresh():
    """The control: glibc's default unmaps the block on free, so this measurement can see the faults
    (unless transparent huge pages back the block, which make the faults few)."""
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        thp = ""
    if "[always]" in thp:
        pytest.skip("transparent huge pages on for every mapping: few faults either way")
    kept, faults = last_round_faults("plain")
    assert kept == "False"
    assert faults > PAGES // 2
