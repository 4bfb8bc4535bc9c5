#!/usr/bin/env python
"""Average the weights of a run's last N validation checkpoints into checkpoints/averaged.pt.

    nmt-train ... trainer.keep_checkpoints=5           # keeps checkpoints/val-STEP.pt of the last 5 validations
    python scripts/average_checkpoints.py --run runs/x --last 5
    nmt-evaluate run=runs/x eval.checkpoint=averaged

Every floating-point tensor of the model's state_dict is the mean of the N checkpoints' tensors
(accumulated in float64); other tensors are taken from the newest. The result is a model-only
checkpoint that nmt-evaluate, nmt-translate and nmt-embeddings load like best.pt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nmt.checkpoint import average_weights, save_checkpoint
from nmt.errors import NMTError
from nmt.run import RunFiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run directory trained with trainer.keep_checkpoints=N")
    parser.add_argument("--last", type=int, default=5, help="how many of the newest validation checkpoints")
    args = parser.parse_args()
    files = RunFiles(Path(args.run))
    found, target = files.validation_checkpoints(), files.checkpoint("averaged")
    try:
        if not files.run_dir.is_dir():
            raise NMTError(f"--run {files.run_dir}: no such run directory. Pass the paths.run_dir of a run trained "
                           f"with trainer.keep_checkpoints=N.")
        if args.last < 1:
            raise NMTError(f"--last must be at least 1, got {args.last}.")
        if len(found) < args.last:
            raise NMTError(f"{target.parent} holds {len(found)} validation checkpoint(s) (val-*.pt), fewer than --last "
                           f"{args.last}. Train with trainer.keep_checkpoints={args.last} (or more), or average fewer.")
        chosen = found[-args.last:]
        save_checkpoint(average_weights(chosen), target)
    except NMTError as error:
        print(f"average_checkpoints: error: {error}", file=sys.stderr)
        return 2
    print(f"averaged {', '.join(p.name for p in chosen)} into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
