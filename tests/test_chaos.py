"""scripts/chaos_resume.py end to end: SIGKILLs at random moments and during a checkpoint write, then
resume; the final weights must equal those of the uninterrupted run."""

from __future__ import annotations

import json
import sys

from conftest import REPO, run_cli


def test_chaos_resume_survives_kills_and_ends_bit_exact(shared_data_dir, tmp_path):
    out_json = tmp_path / "chaos.json"
    out = run_cli(sys.executable, str(REPO / "scripts" / "chaos_resume.py"), "--data-dir", str(shared_data_dir),
                  "--kills", "3", "--seed", "3", "--workdir", str(tmp_path / "work"), "--out", str(out_json),
                  "--", "data.train_limit=500", "data.val_limit=20", "trainer.max_epochs=2",
                  "trainer.validate_every=4", "trainer.num_threads=1", timeout=600)  # (conftest.FAST_DEBUG)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["kills"] == 3 and result["all_equal"]
    restarted = [i for i, e in enumerate(result["events"]) if "from scratch" in e["outcome"]]
    lived = result["events"][restarted[-1] + 1 if restarted else 0:]  # the kills the final run lived through
    assert len(lived) == 3 and all(e["outcome"].startswith("killed") for e in lived)
    torn = [e for e in lived if e["outcome"] == "killed while writing last.pt"]
    assert len(torn) == 1 and torn[0]["resumable_from_step"] > 0  # resumed from the last.pt before the torn one
    assert "survived 3 SIGKILLs" in out.stdout
