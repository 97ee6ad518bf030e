#!/usr/bin/env python3
"""How close a run came to its divergence guard: the largest ratio of the guard's 10-step mean loss
to the lowest full 10-step mean before it (train.divergence_factor stops a run above that ratio;
the rule is in docs/formats.md and rex/train/step.hpp DivergenceGuard).

Usage: python3 scripts/divergence_margin.py RUN_DIR [VOCAB_SIZE]

Reads the "train" records of RUN_DIR/metrics.jsonl. The guard sees every step, so the run must
have logged every step (--set train.log_interval=1); VOCAB_SIZE (default: model.vocab_size of
RUN_DIR/config.json) gives ln(vocab), where the lowest mean starts. Prints the largest ratio and the step it was at.
"""
import json
import math
import os
import sys

WINDOW = 10  # DivergenceGuard::kWindow


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1])
    run = sys.argv[1]
    try:
        if len(sys.argv) == 3:
            vocab = int(sys.argv[2])
        else:
            with open(os.path.join(run, "config.json")) as f:
                vocab = json.load(f)["model"]["vocab_size"]
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"divergence_margin: {run}: {e}")
    losses = [(r["step"], r["lm_loss"]) for r in records if r.get("kind") == "train"]
    steps = [s for s, _ in losses]
    if not steps or steps != list(range(steps[0], steps[0] + len(steps))):
        sys.exit(f"divergence_margin: {run}: the run did not log every step "
                 "(train with --set train.log_interval=1)")
    best, worst, worst_step = math.log(vocab), 0.0, None
    for i in range(len(losses)):
        window = [loss for _, loss in losses[max(0, i - WINDOW + 1):i + 1]]
        mean = sum(window) / len(window)
        if mean / best > worst:
            worst, worst_step = mean / best, losses[i][0]
        if len(window) == WINDOW:
            best = min(best, mean)
    print(f"largest 10-step mean / lowest before it: {worst:.3f} (step {worst_step})")


if __name__ == "__main__":
    main()
