"""Run the CPU demo once per objective (and seed) and compare: steps to reach the target reward, final reward.

    python benchmarks/demo_objectives.py [--objectives rence grpo dapo online_dpo] [--seeds 1 2 3]
                                         [--target 0.9] [--out runs/demo_objectives] [override ...]

Each run is `python -m megatron_rence.train recipes/demo_cpu.yaml objective.name=X train.seed=S ...` in
its own process (same recipe otherwise). "Steps to target" is the first step whose 10-step moving
average of reward/mean reaches --target ("-" when never); "final" is the mean of the last 10 steps.
Prints a markdown table (the one in docs/demo_cpu.md comes from here).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WINDOW = 10


def steps_to_target(rewards: list[tuple[int, float]], target: float) -> int | None:
    for i in range(len(rewards)):
        window = [r for _, r in rewards[max(0, i - WINDOW + 1): i + 1]]
        if len(window) == WINDOW and sum(window) / WINDOW >= target:
            return rewards[i][0]
    return None


def run_one(objective: str, seed: int, out: Path, overrides: list[str]) -> dict:
    run_dir = out / f"{objective}_seed{seed}"
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", f"objective.name={objective}",
           f"train.seed={seed}", f"train.run_dir={run_dir}", "logging.progress_bar=false",
           "logging.tensorboard=false", "logging.plot=false", "checkpoint.every=0", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{objective} seed {seed} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [(r["step"], r["reward/mean"]) for r in records]
    return {"objective": objective, "seed": seed, "seconds": seconds, "steps": len(records),
            "start": sum(r for _, r in rewards[:WINDOW]) / WINDOW, "rewards": rewards,
            "final": sum(r for _, r in rewards[-WINDOW:]) / WINDOW}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["rence", "grpo", "dapo", "online_dpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo_objectives")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    args = parser.parse_args(argv)
    results = []
    for objective in args.objectives:
        for seed in args.seeds:
            r = run_one(objective, seed, args.out, args.overrides)
            r["to_target"] = steps_to_target(r["rewards"], args.target)
            results.append(r)
            print(f"{objective} seed {seed}: start {r['start']:.3f} final {r['final']:.3f} "
                  f"to {args.target} at step {r['to_target']} ({r['seconds']:.0f} s)", flush=True)
    print(f"\n| objective | steps to {args.target} (10-step mean), per seed | final reward (last 10 steps), per seed "
          f"| mean final | wall time per run |")
    print("|---|---|---|---|---|")
    for objective in args.objectives:
        rs = [r for r in results if r["objective"] == objective]
        reached = ", ".join(str(r["to_target"]) if r["to_target"] is not None else "-" for r in rs)
        finals = ", ".join(f"{r['final']:.2f}" for r in rs)
        mean_final = sum(r["final"] for r in rs) / len(rs)
        seconds = sum(r["seconds"] for r in rs) / len(rs)
        print(f"| {objective} | {reached} | {finals} | {mean_final:.2f} | {seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
