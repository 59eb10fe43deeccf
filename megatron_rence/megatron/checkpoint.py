"""Atomic, resharding checkpoints: megatron dist_checkpointing (torch_dist) for weights and optimizer, plus run state.

Layout of a checkpoint root::

    <root>/iter_0000012/          one complete checkpoint (dist_checkpointing files: weights, optimizer, schedule)
             run_state.pt         what the trainer passed (step, data cursor, objective state, ...), from rank 0
             rng/rank_00003.pt    python / numpy / torch / megatron-tracker RNG states of each rank
             meta.json            step, world size and layout (tp, pp, vpp, dp) of the run that wrote it
             manifest.json        size and sha256 of every file above, written last (ckpt_integrity.py)
    <root>/latest                 the name of the newest COMPLETE checkpoint (replaced atomically)

Atomicity: everything is written to ``iter_XXXXXXX.tmp``, fsynced, then renamed to ``iter_XXXXXXX``; only then
is ``latest`` replaced (write ``latest.tmp``, fsync, ``os.replace``). A crash at any point leaves the previous
checkpoint and ``latest`` intact; a left-over ``.tmp`` directory is ignored and removed by the next save.
Pruning (``keep_last``) renames a directory to ``*.deleting`` before removing it, so a half-deleted checkpoint
is never mistaken for a complete one.

Integrity: a checkpoint whose weights hold NaN / inf is never written (NonFiniteWeights); write errors name the
path and the cause (CheckpointWriteError: "no space left on device", "permission denied" ...). At load, the
files are checked against manifest.json; a corrupt or incomplete checkpoint is reported (file named) and,
when a checkpoint root was given, renamed ``iter_XXXXXXX.corrupt`` (never counted by ``latest`` or
``keep_last`` again) and the newest intact one is loaded instead. A checkpoint without manifest.json is refused
unless ``allow_unverified``. ``latest`` only ever names a checkpoint directory of its own root; pruning never
removes the run's ``checkpoint.load`` (``protect``). A checkpoint of another model (tensor shapes) is a
CheckpointLoadError naming the tensors and the ``model.*`` keys that differ.

Resharding: tensors are stored as global ShardedTensors, so a checkpoint written at one TP / PP / VPP / DP
layout loads at another (weights and, with the non-distributed optimizer, Adam moments: they are sharded like
the weights). RNG states are restored only when the world size is unchanged (otherwise they are re-seeded by
``parallel.initialize`` and a message says so).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_rence.megatron.ckpt_integrity import (CheckpointException, CheckpointLoadError, check_finite,
                                                     choose_intact, naming_write_errors, write_manifest)

PathLike = Union[str, Path]
LATEST = "latest"
RUN_STATE = "run_state.pt"
META = "meta.json"
_ITER = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, then `path` itself."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _inside(root: Path, path: Path) -> bool:
    """Whether `path` (symlinks followed) is a directory directly under `root`: a checkpoint of this root."""
    return Path(os.path.realpath(path)).parent == Path(os.path.realpath(root))


def complete_checkpoints(ckpt_root: PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under `ckpt_root`, oldest first (a symlinked iter_* that leads
    out of `ckpt_root`, e.g. into another run, is not one of them)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ITER.match(p.name)) and p.is_dir() and _inside(root, p)]
    return sorted(found)


def latest(ckpt_root: PathLike) -> Optional[Path]:
    """The checkpoint `latest` names (or, if that file is missing or stale, the newest complete one); None if none.
    `latest` must name a checkpoint directory of `ckpt_root` itself: a path elsewhere (``../other/iter_X``, a
    symlink out) is ignored with a warning."""
    root = Path(ckpt_root)
    marker = root / LATEST
    if marker.is_file():
        name = marker.read_text(errors="replace").strip()
        candidate = root / name
        if _ITER.match(name) and candidate.is_dir() and _inside(root, candidate):
            return candidate
        if name and not (_ITER.match(name) and not candidate.exists()) and _rank() == 0:
            print(f"warning: {marker} names {name!r}, which is not a checkpoint directory of {root}: ignored "
                  f"(only checkpoints of this run are resumed); using the newest checkpoint in {root}", flush=True)
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_path(root)


def _overlaps(a: PathLike, b: PathLike) -> bool:
    """Whether one of the two paths (symlinks followed) is the other or inside it."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents


def _prune(root: Path, keep_last: Optional[int], keep: Path, protect: Optional[PathLike] = None) -> None:
    """Remove complete checkpoints beyond the newest `keep_last` (never `keep`, nor one that `protect` (the run's
    checkpoint.load) is, lies in or contains) and stale temporary dirs."""
    for p in root.iterdir():
        if p.is_dir() and (p.name.endswith(".deleting") or (p.name.endswith(".tmp") and p.name.startswith("iter_"))):
            shutil.rmtree(p, ignore_errors=True)
    if not keep_last or keep_last < 1:
        return
    found = complete_checkpoints(root)
    for _, path in found[:-keep_last]:
        if protect is not None and _overlaps(path, protect):
            continue  # the run was asked to read it (checkpoint.load): never removed by pruning
        if path != keep:
            doomed = path.with_name(path.name + ".deleting")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _model_sharded_state_dict(model_chunks: list) -> dict:
    """megatron's convention: "model" for one chunk, "model0", "model1", ... for virtual pipeline stages."""
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU / CUDA, megatron's model-parallel tracker)."""
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": _world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _in_process_results_queue() -> None:
    """Keep megatron's torch_dist writer from starting a multiprocessing Manager process.

    The writer hands its workers' results to the caller through `filesystem_async._results_queue`, by
    default a queue served by a Manager process (spawned at the first save and kept, ~300 MB): a stop
    signal sent to the whole job kills it, and the preemption save then fails with BrokenPipeError; after
    kill -9 of the trainer it stays behind. Our saves are synchronous (the writer runs in this process and
    forks its workers; the fork hook of lifecycle.py makes them ignore the stop signals and die with us),
    so the results never cross a process boundary and an in-process queue does the same job."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no _results_queue: "
                           "revisit checkpoint._in_process_results_queue for this megatron-core version")
    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def _write_sharded(tmp: Path, model_chunks: list, optimizer, scheduler, step: int) -> None:
    from megatron.core import dist_checkpointing

    try:  # the torch_dist writer's forked workers import it; without it they die and the save hangs
        import psutil  # noqa: F401
    except ImportError as e:
        raise ImportError("checkpoints need psutil (megatron's torch_dist writer): pip install psutil") from e
    state = _model_sharded_state_dict(model_chunks)
    if has_optimizer_state(optimizer):
        state["optimizer"] = optimizer.sharded_state_dict(state)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    _in_process_results_queue()
    dist_checkpointing.save(state, str(tmp))


def has_optimizer_state(optimizer) -> bool:
    """Whether the optimizer holds moments (it has none before its first step; then only weights are saved)."""
    if optimizer is None:
        return False
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(p.optimizer is not None and len(p.optimizer.state) > 0 for p in parts)


def _write_run_state(tmp: Path, run_state: dict, step: int, optimizer_state: bool,
                     model_config: Optional[dict]) -> None:
    """Per rank: its RNG states; rank 0: the run state and meta.json. Files are fsynced by their writer."""
    rng_file = tmp / "rng" / f"rank_{_rank():05d}.pt"
    torch.save(rng_state(), rng_file)
    _fsync_path(rng_file)
    if _rank() == 0:
        torch.save(run_state, tmp / RUN_STATE)
        meta = {"step": step, "optimizer_state": optimizer_state, **_layout()}
        if model_config is not None:
            meta["model"] = model_config
        (tmp / META).write_text(json.dumps(meta, indent=1))


def save(ckpt_root: PathLike, step: int, model_chunks: list, optimizer=None, scheduler=None,
         run_state: Optional[dict] = None, keep_last: Optional[int] = None,
         model_config: Optional[dict] = None, protect: Optional[PathLike] = None) -> Path:
    """Write checkpoint `iter_<step>` under `ckpt_root` atomically (all ranks call it); returns its path.

    model_chunks: bare GPTModel chunks; optimizer: megatron optimizer or None (weights only); scheduler:
    OptimizerParamScheduler or None; run_state: picklable dict (the trainer's step, data cursor, objective
    state ...); keep_last: keep this many newest checkpoints (None / 0 = all);
    model_config: the ModelConfig fields, recorded in meta.json (a mismatch at load names the keys);
    protect: a path pruning never removes (the run's checkpoint.load, when it lies in `ckpt_root`).
    """
    root = Path(ckpt_root)
    name = checkpoint_name(step)
    final, tmp = root / name, root / (name + ".tmp")
    check_finite(model_chunks, step, root)
    if _rank() == 0:
        with naming_write_errors(tmp, root):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            tmp.mkdir(parents=True)
    _barrier()
    with naming_write_errors(tmp, root):
        _write_sharded(tmp, model_chunks, optimizer, scheduler, step)  # ends with a barrier
    if _rank() == 0:
        (tmp / "rng").mkdir()
    _barrier()
    with naming_write_errors(tmp, root):
        _write_run_state(tmp, dict(run_state or {}), step, has_optimizer_state(optimizer), model_config)
    _barrier()  # every rank's files are written and fsynced by their writer
    with naming_write_errors(tmp / "manifest.json", root):
        write_manifest(tmp)
    if _rank() == 0:
        _finish_save(root, tmp, final, name, keep_last, protect)
    _barrier()
    return final


def _finish_save(root: Path, tmp: Path, final: Path, name: str, keep_last: Optional[int],
                 protect: Optional[PathLike] = None) -> None:
    """Rank 0: fsync, rename iter_X.tmp -> iter_X, point `latest` at it, prune."""
    with naming_write_errors(final, root):
        _fsync_tree(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace the old copy
            old = final.with_name(name + ".deleting")
            os.rename(final, old)
            shutil.rmtree(old)
        os.rename(tmp, final)
        _fsync_path(root)
        _write_latest(root, name)
        _prune(root, keep_last, keep=final, protect=protect)


def resolve(path: PathLike) -> Path:
    """A checkpoint directory from a root (its latest complete checkpoint) or an iter_* directory."""
    p = Path(path)
    if _ITER.match(p.name) and p.is_dir():
        return p
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist")
    found = latest(p)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint (iter_XXXXXXX directory) under {p}")
    return found


def resolve_intact(path: PathLike, allow_unverified: bool = False, set_aside_corrupt: bool = False) -> Path:
    """Like `resolve`, but checked against each checkpoint's manifest (all ranks): for a root, the newest intact
    checkpoint (`latest` first, then older ones, with a warning naming the corrupt files; with
    `set_aside_corrupt` those are renamed `*.corrupt`); for an iter_* directory, that one or a CheckpointLoadError naming its corrupt files. Without
    a manifest: refused unless `allow_unverified` (checkpoint.allow_unverified)."""
    p = Path(path)
    first = resolve(p)
    if first == p:
        return choose_intact([p], explicit=True, allow_unverified=allow_unverified)
    step = int(_ITER.match(first.name).group(1))
    older = [c for s, c in reversed(complete_checkpoints(p)) if s < step]
    return choose_intact([first, *older], explicit=False, allow_unverified=allow_unverified,
                         set_aside_corrupt=set_aside_corrupt)


def _torch_load(path: Path):
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:  # EOFError / UnpicklingError / RuntimeError name no file
        raise CheckpointLoadError(f"checkpoint file {path} is unreadable ({type(exc).__name__}: {exc})") from exc


def _model_differences(meta: dict, model_config: Optional[dict]) -> str:
    """" (model.hidden_size: 32 in the checkpoint, 64 in this run; ...)" when meta.json recorded the model."""
    saved = meta.get("model")
    if not (isinstance(saved, dict) and model_config):
        return ""
    diffs = [f"model.{k}: {saved[k]!r} in the checkpoint, {model_config[k]!r} in this run"
             for k in sorted(saved) if k in model_config and saved[k] != model_config[k]]
    return f" ({'; '.join(diffs)})" if diffs else ""


def _shapes_differ(saved: tuple, wanted: tuple, padded_rows: bool) -> bool:
    """Whether a stored tensor cannot load into this model's. megatron marks the vocab-padded tensors
    (embedding, output layer: rows padded to a multiple of make_vocab_size_divisible_by x TP)
    allow_shape_mismatch; their row count may differ, their other dimensions may not."""
    if padded_rows:
        return len(saved) != len(wanted) or saved[1:] != wanted[1:]
    return saved != wanted


def check_shapes(ckpt: Path, request: dict, meta: dict, model_config: Optional[dict] = None) -> None:
    """CheckpointLoadError naming the checkpoint and the first tensors whose global shape differs from this
    model's (or that the checkpoint lacks): a checkpoint of another model, found before megatron's loader
    fails with a CheckpointException (a BaseException) naming neither."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        saved = dist_checkpointing.load_tensors_metadata(str(ckpt))
    except (Exception, CheckpointException) as exc:
        raise CheckpointLoadError(f"checkpoint {ckpt}: its tensor metadata is unreadable ({type(exc).__name__}: "
                                  f"{exc})") from exc
    problems = []
    for t in nested_values(request):
        if not isinstance(t, ShardedTensor):
            continue
        if t.key not in saved:
            problems.append(f"{t.key}: not in the checkpoint")
        elif _shapes_differ(tuple(saved[t.key].global_shape), tuple(t.global_shape), t.allow_shape_mismatch):
            problems.append(f"{t.key}: shape {list(saved[t.key].global_shape)} in the checkpoint, "
                            f"{list(t.global_shape)} in this model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointLoadError(f"checkpoint {ckpt} holds another model: {'; '.join(problems[:3])}{more}"
                                  f"{_model_differences(meta, model_config)}. Load it with the model.* settings "
                                  f"of the run that wrote it, or start from another checkpoint")


def load(path: PathLike, model_chunks: list, optimizer=None, scheduler=None, allow_unverified: bool = False,
         model_config: Optional[dict] = None, set_aside_corrupt: bool = False) -> dict:
    """Load weights (and optimizer / scheduler state when given) from `path` at the current layout (all ranks).

    Returns the saved run state (with "checkpoint": the directory loaded). The optimizer state reshards
    across TP / PP / VPP / DP with megatron's non-distributed optimizer; for the distributed optimizer
    (GPU) megatron's own sharded formats decide. Every user-facing failure (corrupt, no manifest without
    `allow_unverified`, another model's shapes: `model_config` names the differing model.* keys) is a
    CheckpointLoadError naming the checkpoint. `set_aside_corrupt`: a resume of the run's own (locked)
    checkpoint root renames the corrupt checkpoints it skips `*.corrupt` (readers such as the exporter do not).
    """
    from megatron.core import dist_checkpointing

    ckpt = resolve_intact(path, allow_unverified, set_aside_corrupt)
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointLoadError(f"checkpoint file {ckpt / META} is unreadable ({type(exc).__name__}: "
                                  f"{exc})") from exc
    request = _model_sharded_state_dict(model_chunks)
    check_shapes(ckpt, request, meta, model_config)
    if optimizer is not None and meta["optimizer_state"]:  # else: saved before the first step, nothing to load
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True)
    try:
        loaded = dist_checkpointing.load(request, str(ckpt))
        keys = ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]
        for key, chunk in zip(keys, model_chunks):
            chunk.load_state_dict(loaded[key], strict=True)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointLoadError(f"checkpoint {ckpt}: loading the sharded tensors failed ({type(exc).__name__}: "
                                  f"{exc}){_model_differences(meta, model_config)}") from exc
    if "optimizer" in request:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:  # saved before the first step: mixed-precision main params from the loaded weights
        optimizer.reload_model_params()
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise CheckpointLoadError(f"checkpoint {ckpt} has no LR scheduler state (saved weights only)")
        scheduler.num_steps = 0  # load_state_dict advances by the saved count
        scheduler.load_state_dict(loaded["scheduler"])
    if meta["world_size"] == _world_size():
        set_rng_state(_torch_load(ckpt / "rng" / f"rank_{_rank():05d}.pt"))
    elif _rank() == 0:
        print(f"checkpoint {ckpt} was written by {meta['world_size']} ranks, this run has {_world_size()}: "
              "RNG states are not restored")
    run_state = _torch_load(ckpt / RUN_STATE)
    run_state["checkpoint"] = str(ckpt)
    return run_state
