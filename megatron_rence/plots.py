"""PNG curves of a run from its metrics.jsonl (reward, loss, lengths, phase times); needs matplotlib (extra `plot`)."""
from __future__ import annotations

from pathlib import Path

from megatron_rence.metrics import read_metrics

PANELS = {
    "reward": ["reward/mean", "reward/pass_rate", "eval/avg_at_k"],
    "loss": ["loss/total", "objective/kl", "train/grad_norm"],
    "groups": ["groups/mixed_frac", "groups/all_positive_frac", "groups/all_negative_frac"],
    "lengths": ["rollout/response_len_mean", "rollout/response_len_max"],
    "phase_times": ["perf/rollout_s", "perf/reward_s", "perf/train_s", "perf/sync_s"],
}


def plot(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, keys in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = 0
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, marker="." if len(points) < 40 else None)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(f"{run_dir.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
