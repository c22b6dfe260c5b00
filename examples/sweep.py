"""A resumable hyper-parameter sweep: fits ridge regression for a grid of penalties, one
trial per second of work, and records finished trials in a checkpoint file so a preempted
run resumes where it stopped instead of starting over."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seconds-per-trial", type=float, default=1.0)
    args = parser.parse_args()
    # The scheduler always sets ANDROMEDA_CHECKPOINT; by hand, a fresh folder of our own.
    ckpt_dir = Path(os.environ.get("ANDROMEDA_CHECKPOINT") or tempfile.mkdtemp(prefix="sweep-"))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "trials.json"
    done: dict[str, float] = json.loads(ckpt.read_text()) if ckpt.exists() else {}
    if done:
        print(f"resuming: {len(done)} of {args.trials} trials already done", flush=True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 50))
    y = x @ rng.normal(size=50) + rng.normal(scale=2.0, size=2000)
    xtr, ytr, xva, yva = x[:1500], y[:1500], x[1500:], y[1500:]
    for i, alpha in enumerate(np.logspace(-3, 3, args.trials)):
        key = f"{alpha:.6g}"
        if key in done:
            continue
        w = np.linalg.solve(xtr.T @ xtr + alpha * np.eye(50), xtr.T @ ytr)
        done[key] = float(np.mean((xva @ w - yva) ** 2))
        time.sleep(args.seconds_per_trial)
        ckpt.write_text(json.dumps(done))
        print(f"trial {i + 1}/{args.trials} alpha={key} val_mse={done[key]:.4f}", flush=True)
    best = min(done, key=lambda k: done[k])
    print(f"best alpha {best} val_mse {done[best]:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
