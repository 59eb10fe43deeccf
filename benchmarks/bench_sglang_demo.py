"""The CPU demo (recipes/demo_cpu.yaml, ReNCE) trained with SGLang's real engine against the transformers engine:
reward over the run and steps/s, each engine in its own `rence-train` process, one after the other.

Run from .venv-sglang (SGLang imports there; tools/setup_sglang_env.sh) so both engines see the same torch and
transformers; the test-only SGLang import shims (tests/sglang_shims) are put on PYTHONPATH for the children:

    .venv-sglang/bin/python benchmarks/bench_sglang_demo.py --steps 300 [--engines sglang hf] [--out DIR]

Prints, per engine: engine start + setup seconds (launch to the first logged step), steps/s over the steps
after the first, mean reward over the first and last 20 steps and every `--every` steps, and the mean
rollout / train / sync seconds per step. Timings depend on the machine's load: compare engines run together.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIMS = REPO / "tests" / "sglang_shims"
SGLANG_CPU = ["rollout.sglang.mem_fraction_static=0.05", "rollout.sglang.extra_args.max_total_tokens=8192",
              "rollout.sglang.extra_args.disable_overlap_schedule=true"]


def run(engine: str, steps: int, run_dir: Path, threads: int) -> tuple[list[dict], float, float]:
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", f"rollout.engine={engine}",
           f"train.num_steps={steps}", f"train.run_dir={run_dir}", "checkpoint.every=0", "logging.tensorboard=false",
           "logging.plot=false", "logging.progress_bar=false"] + (SGLANG_CPU if engine == "sglang" else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIMS), str(REPO)]), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    first_step_at = None
    log = open(run_dir.parent / f"{engine}.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if first_step_at is None and metrics.exists() and metrics.read_text().strip():
            first_step_at = time.perf_counter()
        time.sleep(0.2)
    end = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: rence-train exited {proc.returncode}; see {log.name}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return records, (first_step_at or end) - start, end - (first_step_at or end)


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)


def report(engine: str, records: list[dict], startup_s: float, loop_s: float, every: int) -> dict:
    rewards = [r["reward/mean"] for r in records]
    out = {"engine": engine, "steps": len(records), "startup_s": round(startup_s, 1),
           "steps_per_s": round((len(records) - 1) / loop_s, 3) if loop_s > 0 else None,
           "reward_first20": round(mean(rewards[:20]), 3), "reward_last20": round(mean(rewards[-20:]), 3),
           "reward_every": {r["step"]: round(mean(x["reward/mean"] for x in records[max(0, r["step"] - every):r["step"]]), 3)
                            for r in records if r["step"] % every == 0}}
    for key in ("perf/rollout_s", "perf/train_s", "perf/sync_s", "perf/step_s"):
        out[key] = round(mean(r[key] for r in records[1:] if key in r), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--engines", nargs="+", default=["sglang", "hf"], choices=["sglang", "hf"])
    parser.add_argument("--every", type=int, default=50, help="reward averaged over windows of this many steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_sglang_demo."))
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; runs in {root}", flush=True)
    for engine in args.engines:
        records, startup_s, loop_s = run(engine, args.steps, root / engine, args.threads)
        print(json.dumps(report(engine, records, startup_s, loop_s, args.every)), flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
