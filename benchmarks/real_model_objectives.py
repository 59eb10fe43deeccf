"""ReNCE, GRPO, DAPO and online DPO on the real-model CPU recipe (SmolLM2-135M-Instruct), held-out avg@k before/after.

    python tools/prepare_smollm2.py models/smollm2-135m-instruct          # once
    python benchmarks/real_model_objectives.py [--objectives rence grpo dapo online_dpo] [--steps 28]
        [--k 4] [--heldout 64] [--out runs/real_model_objectives] [--doc docs/real_model.md]
        [--note "what ran, where"] [--decode-threads] [--parallel N] [override ...]

Every objective runs `python -m megatron_rence.train recipes/smollm2_cpu.yaml objective.name=X` with the same
seed, step budget and overrides (one process each, one after the other), evaluating the held-out split at
its last step; "before" is one `rence-eval` of the starting model with the same sampling seed. The
objectives' own hyper-parameters stay at their defaults. Results (a table and two plots: per-step reward,
held-out before/after) go between the markers of the generated section of --doc, with --note and the
wall times, so the hand-written text around it stays; <out>/summary.json keeps the results, and --report-only
rewrites the section and plots from it without running anything. --decode-threads also times the engine's decoding
with 1 and 2 torch threads (one process each). --parallel N runs N of these processes at a time (the
runs get train.num_threads=1 unless an override sets it, so on 2 cores --parallel 2 halves the wall time);
the runs share nothing but the model folder. The comparison in docs/real_model.md ran with --parallel 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/smollm2_cpu.yaml"
BEGIN, END = "<!-- real_model_objectives: begin -->", "<!-- real_model_objectives: end -->"


def _run(cmd: list[str], what: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def evaluate_before(model: Path, out: Path, common: list[str]) -> dict:
    """The starting model on the held-out split (rence-eval, the recipe's eval settings)."""
    _, seconds = _run([sys.executable, "-m", "megatron_rence.evaluate", RECIPE, "--hf-dir", str(model),
                       "--out", str(out / "before"), "logging.progress_bar=false", *common], "eval before")
    summary = json.loads((out / "before" / "results.json").read_text())["benchmarks"]["heldout"]
    return {**summary, "seconds": seconds}


def train_one(objective: str, out: Path, common: list[str], steps: int, keep_checkpoints: bool) -> dict:
    run_dir = out / objective
    _, seconds = _run([sys.executable, "-m", "megatron_rence.train", RECIPE, f"objective.name={objective}",
                       f"train.run_dir={run_dir}", f"train.num_steps={steps}", f"eval.every={steps}",
                       "train.max_minutes=0", "eval.at_start=false", "logging.progress_bar=false", "logging.plot=false", *common],
                      f"training with {objective}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    after = json.loads(sorted((run_dir / "eval").glob("step_*/results.json"))[-1].read_text())
    return {"objective": objective, "seconds": seconds, "records": records, "after": after["benchmarks"]["heldout"],
            "skipped": sum(r.get("train/skipped", 0.0) for r in records)}


def decode_speed(model: Path, threads: int, rows: int = 8, tokens: int = 32) -> float:
    """Tokens per second of the CPU engine sampling `rows` prompts x `tokens` new tokens with `threads` threads."""
    code = f"""
import time, torch
torch.set_num_threads({threads})
from pathlib import Path
from megatron_rence.recipe import load_recipe
from megatron_rence.data.tokenizer import load_tokenizer
from megatron_rence.evaluate import load_hf_engine
from megatron_rence.rollout.types import SamplingParams
cfg = load_recipe("{RECIPE}", ["model.hf_path={model}", "model.tokenizer={model}"])
tok = load_tokenizer(cfg.model)
engine = load_hf_engine(cfg, Path("{model}"), tok)
ids = tok.encode("What is 12 + 7?", add_special_tokens=False)
params = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens={tokens}, stop=[], seed=0)
engine.generate([ids], params, 1)  # warm-up
engine.eos_ids = set()  # every row decodes all {tokens} tokens
t0 = time.perf_counter()
engine.generate([ids] * {rows}, params, 1)
print({rows} * {tokens} / (time.perf_counter() - t0))
"""
    stdout, _ = _run([sys.executable, "-c", code], f"decode speed with {threads} threads")
    return float(stdout.strip().splitlines()[-1])


def plot(results: list[dict], before: dict, k: int, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in results:
        steps = [rec["step"] for rec in r["records"]]
        ax.plot(steps, [rec["reward/mean"] for rec in r["records"]], marker=".", label=r["objective"])
    ax.set_xlabel("step")
    ax.set_ylabel("reward/mean (training batch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    reward_png = out_dir / "reward.png"
    fig.savefig(reward_png, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["before"] + [r["objective"] for r in results]
    values = [100 * before[f"avg@{k}"]] + [100 * r["after"][f"avg@{k}"] for r in results]
    ax.bar(names, values, color=["gray"] + ["C0"] * len(results))
    ax.set_ylabel(f"held-out avg@{k} (%)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    heldout_png = out_dir / "heldout.png"
    fig.savefig(heldout_png, dpi=100)
    plt.close(fig)
    return [reward_png, heldout_png]


def report(results: list[dict], before: dict, k: int, steps: int, note: str, speeds: dict, pngs: list[Path],
           doc: Path) -> str:
    lines = [BEGIN, "", f"Generated by `benchmarks/real_model_objectives.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
             "", f"**What ran:** {note}" if note else "", "",
             f"| model | steps | held-out avg@{k} | pass@{k} | fallback (all / correct) | mean len | truncated | "
             f"skipped steps | wall time |", "|---|---|---|---|---|---|---|---|---|",
             f"| start (before training) | 0 | {100 * before[f'avg@{k}']:.1f} | {100 * before[f'pass@{k}']:.1f} | "
             f"{100 * before['fallback_frac']:.0f}% / {100 * before['correct_fallback_frac']:.0f}% | "
             f"{before.get('response_len_mean', float('nan')):.0f} | "
             f"{100 * before['truncated_frac']:.0f}% | - | {before['seconds']:.0f} s (eval) |"]
    for r in results:
        a = r["after"]
        lines.append(f"| {r['objective']} | {len(r['records'])} | {100 * a[f'avg@{k}']:.1f} | {100 * a[f'pass@{k}']:.1f} | "
                     f"{100 * a['fallback_frac']:.0f}% / {100 * a['correct_fallback_frac']:.0f}% | "
                     f"{a.get('response_len_mean', float('nan')):.0f} | "
                     f"{100 * a['truncated_frac']:.0f}% | {r['skipped']:.0f} | {r['seconds']:.0f} s |")
    if steps and any(len(r["records"]) != steps for r in results):
        lines.append(f"\nSome runs stopped before {steps} steps (see their metrics.jsonl).")
    if speeds:
        lines += ["", "Engine decoding speed (8 rows x 32 new tokens, one process): " +
                  ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v:.1f} tokens/s" for t, v in speeds.items())]
    lines += [""] + [f"![{p.stem}]({os.path.relpath(p, doc.parent)})" for p in pngs] + ["", END]
    return "\n".join(lines)


def write_section(doc: Path, section: str) -> None:
    """Replace the generated section of `doc` (or append one), atomically."""
    text = doc.read_text() if doc.exists() else "# A real model on CPU\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objectives", nargs="+", default=["rence", "grpo", "dapo", "online_dpo"])
    parser.add_argument("--steps", type=int, default=28, help="optimizer steps per objective (same for all)")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out problem (avg@k, pass@k)")
    parser.add_argument("--heldout", type=int, default=64, help="held-out problems (data.synthetic.num_heldout)")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "real_model_objectives")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "real_model.md")
    parser.add_argument("--note", default="", help="what was run and where (written into the doc)")
    parser.add_argument("--decode-threads", action="store_true", help="also time decoding with 1 and 2 threads")
    parser.add_argument("--parallel", type=int, default=1, help="processes at a time (each has train.num_threads)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's ~1.6 GB checkpoint")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the doc section and plots from <out>/summary.json of an earlier run")
    parser.add_argument("overrides", nargs="*", help="recipe overrides applied to every run")
    args = parser.parse_args(argv)
    summary_path = args.out / "summary.json"
    if args.report_only:
        if not summary_path.is_file():
            print(f"error: --report-only: no {summary_path} (written at the end of a full run)", file=sys.stderr)
            return 2
        saved = json.loads(summary_path.read_text())
        publish(saved["results"], saved["before"], saved["k"], saved["steps"], saved["note"],
                {int(t): v for t, v in saved["speeds"].items()}, args.doc)
        return 0
    if not (args.model / "config.json").is_file():
        print(f"error: no model at {args.model}; run tools/prepare_smollm2.py {args.model}", file=sys.stderr)
        return 2
    threads = [] if args.parallel == 1 or any(o.startswith("train.num_threads=") for o in args.overrides) \
        else ["train.num_threads=1"]  # N processes side by side: one torch thread each
    common = [f"model.hf_path={args.model}", f"model.tokenizer={args.model}", f"eval.num_samples={args.k}",
              f"data.synthetic.num_heldout={args.heldout}", *threads, *args.overrides]
    speeds = {t: decode_speed(args.model, t) for t in (1, 2)} if args.decode_threads else {}
    if args.parallel < 1:
        parser.error(f"--parallel must be >= 1, got {args.parallel}")

    def trained(objective: str) -> dict:
        r = train_one(objective, args.out, common, args.steps, args.keep_checkpoints)
        print(f"{objective}: held-out avg@{args.k} {100 * r['after'][f'avg@{args.k}']:.1f}% after "
              f"{len(r['records'])} steps ({r['seconds']:.0f} s)", flush=True)
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:  # each job is a subprocess
        before_job = pool.submit(evaluate_before, args.model, args.out, common)
        jobs = [pool.submit(trained, objective) for objective in args.objectives]
        before = before_job.result()
        print(f"before: held-out avg@{args.k} {100 * before[f'avg@{args.k}']:.1f}% ({before['seconds']:.0f} s)", flush=True)
        results = [job.result() for job in jobs]
    total = time.perf_counter() - t0
    if args.parallel > 1:
        args.note = f"{args.note} ({args.parallel} processes at a time, {total / 60:.0f} min in all)".strip()
    saved = {"results": results, "before": before, "k": args.k, "steps": args.steps, "note": args.note, "speeds": speeds}
    summary_path.write_text(json.dumps(saved, indent=1))
    publish(results, before, args.k, args.steps, args.note, speeds, args.doc)
    return 0


def publish(results: list[dict], before: dict, k: int, steps: int, note: str, speeds: dict, doc: Path) -> None:
    """The plots next to `doc` and the generated section in it; the section is also printed."""
    pngs = plot(results, before, k, doc.parent / "real_model")
    section = report(results, before, k, steps, note, speeds, pngs, doc)
    write_section(doc, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
