"""Checkpoint integrity: a sha256 manifest written at save and checked at load, the non-finite weight guard,
and write errors that name the path and the cause.

``manifest.json`` (written last into ``iter_XXXXXXX.tmp``, atomically, before the directory is renamed)::

    {"format": 1, "files": {"__0_0.distcp": {"size": 136301, "sha256": "..."}, "run_state.pt": {...}, ...}}

Hashing and checking are shared by all ranks (rank r hashes files r, r + world, ...; the results are
gathered), so every rank reaches the same verdict. A checkpoint without a manifest (written before manifests
existed, or the file was deleted) cannot be verified and is refused unless checkpoint.allow_unverified=true.
A checkpoint of a checkpoint root found corrupt is renamed ``iter_XXXXXXX.corrupt`` (never loaded, counted by
keep_last or pruned again).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

MANIFEST = "manifest.json"
_CHUNK = 4 << 20
ALLOW_KEY = "checkpoint.allow_unverified"
_LOW_SPACE = 64 << 20  # bytes free below which a write failure without an errno is reported as a full disk


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message names the path and the cause (no space, permission ...)."""


class CheckpointLoadError(ValueError):
    """A checkpoint cannot be loaded (corrupt, unverifiable, another model's); the message names it and why."""


class NonFiniteWeights(RuntimeError):
    """A checkpoint was not written because a weight is NaN or infinite."""


def _dist() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj) -> list:
    rank, world = _dist()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj):
    if _dist()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.endswith(".tmp"))


def write_manifest(ckpt: Path) -> None:
    """All ranks: hash this rank's share of the files under `ckpt`; rank 0 writes manifest.json atomically."""
    rank, world = _dist()
    names = _broadcast(_files(ckpt) if rank == 0 else None)
    mine = {n: {"size": (ckpt / n).stat().st_size, "sha256": sha256_file(ckpt / n)} for n in names[rank::world]}
    entries = {k: v for part in _all_gather(mine) for k, v in part.items()}
    if rank == 0:
        tmp = ckpt / (MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"format": 1, "files": dict(sorted(entries.items()))}, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ckpt / MANIFEST)


def _check_share(ckpt: Path, names: list[str], files: dict) -> list[str]:
    problems = []
    for name in names:
        path, want = ckpt / name, files[name]
        try:
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != want["size"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)")
            elif sha256_file(path) != want["sha256"]:
                problems.append(f"{path}: content does not match its sha256 in {MANIFEST} (corrupt)")
        except (OSError, KeyError, TypeError) as exc:  # every rank must reach the gather: report, do not raise
            problems.append(f"{path}: cannot be checked ({type(exc).__name__}: {exc})")
    return problems


def verify(ckpt: Path) -> Optional[list[str]]:
    """All ranks: the problems of checkpoint dir `ckpt` ([] = intact), or None when it has no manifest."""
    rank, world = _dist()
    manifest = None
    if rank == 0:
        path = ckpt / MANIFEST
        if not path.exists():
            manifest = "absent"
        else:
            try:
                manifest = json.loads(path.read_text())["files"]
                if not isinstance(manifest, dict):
                    raise TypeError(f"'files' is a {type(manifest).__name__}, not a mapping")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                manifest = f"{path}: unreadable ({type(exc).__name__}: {exc})"
    manifest = _broadcast(manifest)
    if manifest == "absent":
        return None
    if isinstance(manifest, str):
        return [manifest]
    names = sorted(manifest)
    return [p for part in _all_gather(_check_share(ckpt, names[rank::world], manifest)) for p in part]


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


def _quarantine(ckpt: Path) -> Path:
    """Rank 0: rename a checkpoint found corrupt to `iter_XXXXXXX.corrupt[.n]`, out of reach of `latest`,
    `keep_last` and every later resume (kept for inspection, never pruned)."""
    target = ckpt.with_name(ckpt.name + ".corrupt")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.corrupt.{n}")
    os.rename(ckpt, target)
    return target


def choose_intact(candidates: list[Path], explicit: bool, allow_unverified: bool = False,
                  set_aside_corrupt: bool = False) -> Path:
    """The first of `candidates` (newest first) whose files match their manifest; warns about each one skipped.

    With `explicit` (the user named one checkpoint directory) a corrupt one is an error instead. Otherwise
    (candidates of one checkpoint root), with `set_aside_corrupt` (a run resuming its own checkpoint dir, which
    it holds locked), each corrupt one skipped is renamed `<name>.corrupt` so that neither `latest` nor
    `keep_last` counts it again. A checkpoint without manifest.json cannot be verified: it is
    refused (skipped in a root, not renamed) unless `allow_unverified` (checkpoint.allow_unverified)."""
    rank, _ = _dist()
    skipped, unverified = [], []
    for ckpt in candidates:
        problems = verify(ckpt)
        if problems is None and allow_unverified:
            if rank == 0:
                print(f"checkpoint {ckpt} has no {MANIFEST}: loading it unchecked (checkpoint.allow_unverified=true)",
                      flush=True)
            return ckpt
        if problems is None:
            why = (f"checkpoint {ckpt} has no {MANIFEST} (written before checksums, or the file was removed): it "
                   f"cannot be verified; set {ALLOW_KEY}=true (tools/export_megatron_to_hf.py: --allow-unverified) to load "
                   f"it unchecked")
            if explicit:
                raise CheckpointLoadError(why)
            unverified.append(why)
            continue
        if not problems:
            if (skipped or unverified) and rank == 0:
                print(f"warning: loading {ckpt}, the newest intact checkpoint; skipped: "
                      + "; ".join(unverified + [p for _, ps in skipped for p in ps]), flush=True)
            if set_aside_corrupt:
                _set_aside_corrupt(skipped, rank)
            return ckpt
        if explicit:
            raise CheckpointLoadError(f"checkpoint {ckpt} is corrupt or incomplete: " + "; ".join(problems))
        skipped.append((ckpt, problems))
    if set_aside_corrupt:
        _set_aside_corrupt(skipped, rank)
    raise CheckpointLoadError("no intact checkpoint: " + "; ".join(unverified + [p for _, ps in skipped for p in ps]))


def _set_aside_corrupt(skipped: list, rank: int) -> None:
    if rank == 0:
        for ckpt, _ in skipped:
            try:
                moved = _quarantine(ckpt)
            except OSError as exc:
                print(f"warning: could not rename the corrupt checkpoint {ckpt} ({exc})", flush=True)
            else:
                print(f"warning: the corrupt checkpoint {ckpt} is renamed {moved.name} (kept for inspection; "
                      f"neither latest nor checkpoint.keep_last counts it; delete it when done)", flush=True)
    _barrier()


def check_finite(model_chunks: list, step: int, root: Path) -> None:
    """All ranks: NonFiniteWeights naming the first NaN / inf parameter on any rank (nothing is written)."""
    rank, _ = _dist()
    bad = None
    for i, chunk in enumerate(model_chunks):
        for name, p in chunk.named_parameters():
            if not bool(torch.isfinite(p.detach()).all()):
                bad = f"{'' if len(model_chunks) == 1 else f'chunk {i} '}{name} (rank {rank})"
                break
        if bad:
            break
    found = [b for b in _all_gather(bad) if b]
    if found:
        raise NonFiniteWeights(f"not writing the checkpoint of step {step} under {root}: parameter {found[0]} "
                               f"holds NaN / inf values (the run diverged; `latest` still names the last good "
                               f"checkpoint; lower optim.lr or check the data)")


def _errno_of(exc: BaseException) -> Optional[int]:
    """The errno of `exc` or of an exception it wraps (cause / context / the (exception, traceback) failures of
    a CheckpointException); else ENOSPC when a message says so (megatron's writer workers re-raise the OSError
    as a RuntimeError text)."""
    seen, todo, texts = set(), [exc], []
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        texts.append(str(e))
        failures = getattr(e, "failures", None) or {}
        todo += [e.__cause__, e.__context__, *(f[0] if isinstance(f, tuple) else f for f in failures.values())]
    if any("No space left on device" in t or "[Errno 28]" in t for t in texts):
        return errno.ENOSPC
    return None


def describe_write_error(exc: BaseException, root: Path) -> str:
    code = _errno_of(exc)
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (code is None and free is not None and free < _LOW_SPACE):
        return f"no space left on device ({free if free is not None else '?'} bytes free under {root})"
    if code is not None:
        return f"{os.strerror(code).lower()} ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def naming_write_errors(what: Path, root: Path) -> Iterator[None]:
    """Re-raise OSError / RuntimeError of a checkpoint write as CheckpointWriteError naming `what` and the cause."""
    try:
        yield
    except (CheckpointWriteError, NonFiniteWeights):
        raise
    except (OSError, RuntimeError, CheckpointException) as exc:
        raise CheckpointWriteError(f"writing checkpoint {what} failed: {describe_write_error(exc, root)}") from exc
