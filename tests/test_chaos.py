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
                  "trainer.validate_every=4", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["kills"] == 3 and result["all_equal"]
    assert any("while writing" in e["outcome"] for e in result["events"])
    assert "survived 3 SIGKILLs" in out.stdout
