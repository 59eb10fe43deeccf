"""Step metrics to stdout, `metrics.jsonl`, TensorBoard and (when configured and installed) wandb; a progress bar."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_rence.config import LoggingConfig

_BAR_KEYS = (("reward/mean", "reward"), ("loss/total", "loss"), ("perf/step_s", "s/step"))


class MetricsLogger:
    """Writes one record per step. Only the rank that owns logging (rank 0) should construct one.

    On resume, records after `resume_step` (steps that will be run again) are dropped from metrics.jsonl.
    A fresh run in a directory that still has a metrics.jsonl (a run that stopped before its first checkpoint:
    with checkpoints, `rundir.check_fresh_launch` refuses the launch or, with train.overwrite, sets it aside)
    renames the old log to metrics.jsonl.<n> and says so.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: str | os.PathLike, num_steps: int, start_step: int = 0,
                 resume_step: int | None = None, run_name: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_after(self.jsonl_path, resume_step)
        elif self.jsonl_path.exists() and self.jsonl_path.stat().st_size == 0:
            self.jsonl_path.unlink()
        elif self.jsonl_path.exists():
            keep_aside(self.jsonl_path)  # a fresh run starts a fresh log; the old one is kept, not lost
        self._jsonl = open(self.jsonl_path, "a") if cfg.jsonl else None
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # on resume, events of the steps after the checkpoint (about to be run again) are purged
            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        self._wandb = None
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("logging.wandb_project is set but wandb is not installed; skipping wandb")
            else:
                self._wandb = wandb.init(project=cfg.wandb_project, name=run_name or self.run_dir.name,
                                         dir=str(self.run_dir), resume="allow")
        self._bar = tqdm(total=num_steps, initial=start_step, desc="train", dynamic_ncols=True,
                         disable=not cfg.progress_bar)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        if self._jsonl is not None:
            try:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
            except OSError as exc:  # a full disk names no file by itself
                raise OSError(exc.errno, f"{self.jsonl_path}: writing the metrics of step {step} failed: "
                              f"{os.strerror(exc.errno).lower() if exc.errno else exc}") from exc
        if self._tb is not None:
            self._log_tensorboard(step, record)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        postfix = {short: f"{record[key]:.3g}" for key, short in _BAR_KEYS if isinstance(record.get(key), float)}
        if self._bar.disable:
            print(format_line(record), flush=True)
        else:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
            self._bar.write(format_line(record))

    def _log_tensorboard(self, step: int, record: dict[str, Any]) -> None:
        try:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        except OSError as exc:  # raised by TensorBoard's writer thread (a full disk): names no file by itself
            self._tb = None  # the writer is dead; close() must not raise it again
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise OSError(exc.errno, f"{self.run_dir / 'tensorboard'}: writing the TensorBoard events of step {step} "
                          f"failed: {reason} (logging.tensorboard=false turns them off)") from exc

    def close(self) -> None:
        self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def format_line(record: dict[str, Any], keys: tuple[str, ...] = (
        "reward/mean", "reward/pass_rate", "reward/fallback_frac", "groups/mixed_frac", "loss/total",
        "rollout/response_len_mean",
        "mismatch/abs_mean", "perf/rollout_s", "perf/train_s", "perf/sync_s")) -> str:
    parts = [f"step {record['step']}"]
    for key in keys:
        value = record.get(key)
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
    return " | ".join(parts)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [record for _, record in parse_records(path)]


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    return value if isinstance(value, (str, list, dict)) or value is None else float(value)


def parse_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a metrics.jsonl (or eval summary.jsonl); a torn last line (a crash or a
    full disk mid-write) is dropped with a warning; a bad line elsewhere is a ValueError naming file:line."""
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    out = []
    for i, (line_no, line) in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from None
            print(f"warning: {path}:{line_no}: dropping a torn last line ({len(line)} characters, not JSON: "
                  f"{exc.msg}); the run was probably killed or the disk filled while it was written", flush=True)
    return out


def keep_aside(path: Path, what: str = "metrics") -> Path:
    """Rename `path` to the first free `<path>.<n>` (n = 1, 2, ...), print where it went, return the new path."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    kept = path.with_name(f"{path.name}.{n}")
    os.replace(path, kept)
    print(f"{what}: {path} of an earlier run (no checkpoint to resume from) kept as {kept}", flush=True)
    return kept


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line, record in parse_records(path) if record.get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
