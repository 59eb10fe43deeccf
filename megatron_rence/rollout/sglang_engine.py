"""The colocated SGLang rollout engine: one in-process `sglang.Engine` per inference TP group (GPU; on CPU,
train.device=cpu, SGLang's native-torch path, which the `sglang` test tier runs: tests/sglang/).

Written against SGLang 0.5.5.post3 (the Dockerfile's pin; read from its wheel, python/sglang/srt/):
entrypoints/engine.py (`Engine`: each sync method runs `loop.run_until_complete(tokenizer_manager.X(obj, None))`),
managers/io_struct.py (`GenerateReqInput`, `UpdateWeightsFromTensorReqInput(..., weight_version)`,
`Release/ResumeMemoryOccupationReqInput(tags)`), constants.py (tags "weights", "kv_cache", "cuda_graph"),
managers/scheduler_update_weights_mixin.py (releasing kv_cache flushes the cache; resume pops tags, so
only released tags may be resumed), layers/sampler.py (returned log-probs are log_softmax(logits / T)).
`Engine.update_weights_from_tensor` has no `weight_version` argument at this version, so we send the
request object ourselves, exactly as that method does, which also lets every call be guarded:

- lifecycle: the group's first rank starts the engine with dummy weights (`load_format="dummy"`) on
  GPUs base_gpu_id .. base_gpu_id + tp - 1, `enable_memory_saver`, the recipe's memory fraction;
  the trainer pushes real weights before the first rollout.
- per step (rollout/engine.py): generate -> release_memory (flush_cache, retried while SGLang's scheduler
  still holds a batch, up to `rollout.sglang.flush_timeout_s`; then release all tags) ->
  resume_memory(["weights"]) -> update_weights per bucket (sglang_transport.py) -> resume_memory(["kv_cache"]).
- crashes: each call polls the engine's processes every `health_poll_s` and SGLang's SIGQUIT (which its
  children send to us, and which would otherwise kill the trainer) only marks the engine dead. A crash
  restarts the engine (dummy weights); `health()` stays False until weights are pushed again (a crash
  during a sync skips its remaining buckets and keeps the flag past `resume_memory(["kv_cache"])`). `generate` re-pushes through `on_restart(engine)` when the trainer set
  it (single-rank groups), else raises `EngineRestartedError` so the trainer re-syncs collectively.
  Training state is never touched.
- hangs: a call that gets no answer in `rollout.sglang.request_timeout_s` is treated as a crash (the
  engine is killed and restarted as above), so a hung engine cannot hang the job.
- signals: SGLang installs SIGTERM / SIGQUIT handlers that kill the process tree; the trainer's own
  SIGTERM handler is restored (checkpoint-on-SIGTERM keeps working) and SIGQUIT is ours. Slurm and
  `kill -- -PGID` also signal the engine's scheduler / detokenizer processes: they are created with
  SIGTERM / SIGUSR1 / SIGINT blocked (lifecycle.stop_signals_blocked; the mask is inherited through
  SGLang's spawn and never unblocked there), so the engine lives until the trainer has checkpointed and
  shuts it down; they die with the trainer (SGLang's own PR_SET_PDEATHSIG). (Residual: a stop signal that
  reaches the trainer in the microseconds while the tokenizer manager's loop handlers are swapped out at
  engine start is lost.) Shutdown kills only the
  engine's own processes (SGLang's `Engine.shutdown` kills every child, reward workers included).
"""
from __future__ import annotations

import asyncio
import atexit
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import yaml

from megatron_rence.lifecycle import descendants, start_resource_tracker, stop_signals_blocked
from megatron_rence.rollout.engine import EngineRestartedError  # noqa: F401  (raised here; re-exported)
from megatron_rence.rollout.sglang_transport import BucketSender, sglang_payload, sglang_serialize
from megatron_rence.rollout.types import Completion, GenerateRequest, SamplingParams, group_rows

ALL_TAGS = ("weights", "kv_cache", "cuda_graph")  # sglang.srt.constants.GPU_MEMORY_ALL_TYPES
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class EngineCrashed(RuntimeError):
    """The engine's processes died during a call."""


# ---- pure pieces: server arguments, sampling parameters, outputs ---------------------------------------
def server_kwargs(s, model_dir: str, dtype: str, seed: int, base_gpu_id: int, engine_on_node: int,
                  device: str = "cuda") -> dict:
    """`sglang.Engine(**kwargs)` for `rollout.sglang` section `s` (SGLangConfig); see ServerArgs.

    `device="cpu"` (train.device=cpu): SGLang's CPU path (torch_native attention, no CUDA graphs); the
    memory saver is CUDA-only there (torch_memory_saver needs libcuda), so it is off whatever the recipe
    says, and the idle scheduler sleeps instead of spinning a core."""
    port = s.base_port + 100 * engine_on_node
    kwargs = dict(model_path=model_dir, tokenizer_path=model_dir, load_format="dummy", dtype=DTYPES[dtype],
                  tp_size=s.tp, base_gpu_id=base_gpu_id, mem_fraction_static=s.mem_fraction_static,
                  enable_memory_saver=s.enable_memory_saver, random_seed=seed, port=port, nccl_port=port + 1,
                  log_level=s.log_level, skip_server_warmup=True)
    if s.deterministic_inference:
        kwargs["enable_deterministic_inference"] = True
    if device == "cpu":
        kwargs.update(device="cpu", base_gpu_id=0, enable_memory_saver=False, disable_cuda_graph=True,
                      sleep_on_idle=True)
    for key, text in s.extra_args.items():
        kwargs[key] = yaml.safe_load(text) if isinstance(text, str) else text
    return kwargs


def row_seed(seed: int, row: int) -> int:
    """Distinct per-row sampling seeds (identical seeds would give identical samples of one prompt)."""
    return (seed * 1_000_003 + row) % (2**31 - 1)


def sampling_dicts(params: SamplingParams, num_rows: int) -> list[dict]:
    """SGLang's per-request `sampling_params` (sglang.srt.sampling.sampling_params.SamplingParams kwargs)."""
    # SGLang disables top-k with -1 only (its verify() rejects 0); ours disables it with any value <= 0
    top_k = params.top_k if params.top_k > 0 else -1
    base = dict(temperature=params.temperature, top_p=params.top_p, top_k=top_k,
                max_new_tokens=params.max_new_tokens, stop=list(params.stop) or None)
    if params.seed is None:
        return [dict(base) for _ in range(num_rows)]
    return [dict(base, sampling_seed=row_seed(params.seed, row)) for row in range(num_rows)]


def parse_output(out: dict, fallback_version: int) -> Completion:
    """One element of SGLang's generate result -> Completion (token ids from the log-prob entries)."""
    meta = out["meta_info"]
    reason = meta["finish_reason"]["type"] if meta.get("finish_reason") else "length"
    if reason not in ("stop", "length"):
        raise RuntimeError(f"SGLang request {meta.get('id')} ended with {meta['finish_reason']}")
    entries = meta["output_token_logprobs"]  # [(logprob, token_id, text or None)]
    token_ids = [int(e[1]) for e in entries]
    if "output_ids" in out:
        assert list(out["output_ids"]) == token_ids, "output_ids and output_token_logprobs disagree"
    version = meta.get("weight_version")
    return Completion(token_ids=token_ids, logprobs=[float(e[0]) for e in entries], finish_reason=reason,
                      weight_version=int(version) if str(version).isdigit() else fallback_version,
                      text=out.get("text", ""))


def check_fp8_shapes(model_cfg, engine_tp: int) -> None:
    """ConfigError before the engine starts if SGLang's block-FP8 layers would refuse the model's shapes."""
    from megatron_rence.config import ConfigError
    from megatron_rence.planning.layout import sglang_fp8_shape_error

    problem = sglang_fp8_shape_error(model_cfg, engine_tp)
    if problem:
        raise ConfigError(problem)


def write_model_dir(hf_config, tokenizer, path: Path, fp8: bool) -> Path:
    """config.json + tokenizer files: all SGLang needs to build the model with dummy weights.

    Written so that SGLang's transformers (4.57.1) reads the same RoPE base and tokenizer as ours
    (weights/portable.py); `architectures` picks SGLang's model class (its ServerArgs fails without it)."""
    from megatron_rence.weights.portable import make_portable

    if not getattr(hf_config, "architectures", None):
        raise ValueError(f"{path}: the model config has no `architectures` (e.g. ['LlamaForCausalLM']); "
                         "SGLang picks its model class from it")
    path.mkdir(parents=True, exist_ok=True)
    if fp8:  # the sync stream then carries float8_e4m3fn weights with 128x128 block scales
        hf_config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
    hf_config.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    make_portable(path)
    return path


# ---- the engine's processes (Linux /proc; SGLang runs on Linux only) ---------------------------------
def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@dataclass
class Backend:
    """What the adapter takes from SGLang: the Engine class and its request dataclasses (io_struct).
    Unit tests pass a fake engine; the `sglang` tier (tests/sglang/) runs the real one on CPU."""

    make_engine: Callable[..., Any]
    io: Any

    @classmethod
    def sglang(cls) -> "Backend":
        import sglang
        from sglang.srt.managers import io_struct

        return cls(sglang.Engine, io_struct)


class SGLangEngine:
    """`RolloutEngine` over a colocated SGLang engine; built on every rank of the engine's group.

    The group's first rank (the owner) runs the engine; the others only take part in `update_weights`
    (each serializes its own GPU copy of a bucket) and treat the other calls as no-ops.
    """

    def __init__(self, kwargs: dict, group=None, *, backend: Optional[Backend] = None, max_restarts: int = 2,
                 poll_s: float = 5.0, make_payload: Callable = sglang_payload, serialize: Callable = sglang_serialize,
                 request_timeout_s: Optional[float] = None, flush_timeout_s: float = 60.0):
        self.kwargs = kwargs
        self.sender = BucketSender(kwargs["tp_size"], group, make_payload, serialize)
        self.is_owner = self.sender.is_owner
        self.backend = backend
        self.max_restarts = max_restarts
        self.poll_s = poll_s
        self.request_timeout_s = request_timeout_s  # None: unbounded
        self.flush_timeout_s = flush_timeout_s
        self.flush_retries = 0  # flush_cache calls answered "not now" (the scheduler still held a batch)
        self.memory_saver = bool(kwargs.get("enable_memory_saver", False))
        self.weight_version = 0
        self.num_restarts = 0
        self.on_restart: Optional[Callable[["SGLangEngine"], None]] = None  # trainer: re-push current weights
        self.needs_weights = True  # dummy weights until a sync ends
        self.engine = None
        self._pids: set[int] = set()
        self._sigquit = False
        self._quit_handler: Any = None  # this process's SIGQUIT handler before the first start: shutdown restores it
        self._released: set[str] = set()
        self._sync_failed = False
        self._cache_dirty = False
        if self.is_owner:
            self.backend = backend or Backend.sglang()
            self._start()
            atexit.register(self.shutdown)

    @classmethod
    def from_config(cls, cfg, hf_config, tokenizer, group=None) -> "SGLangEngine":
        from megatron_rence.config import ConfigError

        s = cfg.rollout.sglang
        if s.fp8_weights:
            check_fp8_shapes(cfg.model, s.tp)
        if s.deterministic_inference and cfg.train.device == "cpu":  # SGLang's own error blames the user
            raise ConfigError("rollout.sglang.deterministic_inference=true needs one of SGLang's GPU attention "
                              "backends (flashinfer, fa3, triton); on train.device=cpu it runs torch_native")
        rank = dist.get_rank() if dist.is_initialized() else 0
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        base_gpu_id = torch.cuda.current_device() if torch.cuda.is_available() else local_rank
        model_dir = Path(s.model_dir or Path(cfg.train.run_dir) / "sglang_model") / f"rank{rank}"
        owner = group is None or dist.get_rank(group) == 0
        if owner:
            write_model_dir(hf_config, tokenizer, model_dir, s.fp8_weights)
        kwargs = server_kwargs(s, str(model_dir), cfg.model.dtype, cfg.train.seed, base_gpu_id, local_rank // s.tp,
                               device="cpu" if cfg.train.device == "cpu" else "cuda")
        return cls(kwargs, group, max_restarts=s.max_restarts, poll_s=s.health_poll_s,
                   request_timeout_s=s.request_timeout_s, flush_timeout_s=s.flush_timeout_s)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        start_resource_tracker()  # CPython's, shared by every spawn of this process: not one of the engine's
        before = descendants(os.getpid())
        term_handler = signal.getsignal(signal.SIGTERM)
        if self._quit_handler is None:  # a restart keeps the first one
            self._quit_handler = signal.getsignal(signal.SIGQUIT)
        with stop_signals_blocked():  # the engine's processes inherit the block: a job-wide SIGTERM spares them
            self.engine = self.backend.make_engine(**self.kwargs)
        atexit.unregister(self.engine.shutdown)  # it kills every child of this process
        self._pids = descendants(os.getpid()) - before
        # The tokenizer manager installs its SIGTERM / SIGQUIT loop handlers on first use: do it now, then undo.
        self.engine.tokenizer_manager.auto_create_handle_loop()
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            self.engine.loop.remove_signal_handler(sig)
        signal.signal(signal.SIGTERM, term_handler)
        signal.signal(signal.SIGQUIT, self._on_sigquit)
        self._sigquit = False
        self._released = set()
        self.needs_weights = True
        self._cache_dirty = False

    def _on_sigquit(self, signum, frame) -> None:
        self._sigquit = True  # a child of the engine failed; the pending call's guard raises EngineCrashed

    def _engine_alive(self) -> bool:
        return not self._sigquit and all(_alive(pid) for pid in self._pids)

    def _kill(self) -> None:
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        for pid in self._pids:  # reap direct children (no zombies left); others are reaped by their parent
            while True:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > deadline:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.02)
        self._pids, self.engine = set(), None

    def restart(self) -> None:
        """Replace the engine by a fresh one (dummy weights); counts against `max_restarts`."""
        if self.num_restarts >= self.max_restarts:
            raise RuntimeError(f"SGLang engine crashed {self.num_restarts + 1} times "
                               f"(rollout.sglang.max_restarts={self.max_restarts}); giving up")
        self.num_restarts += 1
        self._kill()
        self._start()

    def health(self) -> bool:
        if not self.is_owner:
            return True
        return self.engine is not None and self._engine_alive() and not self.needs_weights

    def shutdown(self) -> None:
        if self.is_owner and self.engine is not None:
            self._kill()
            signal.signal(signal.SIGQUIT, self._quit_handler or signal.SIG_DFL)

    # ---- guarded calls -----------------------------------------------------------------------------
    def _call(self, make_coro: Callable[[], Any]):
        """Run one tokenizer-manager coroutine on the engine's loop, polling the engine's health; past
        `request_timeout_s` without an answer the engine counts as crashed (hung)."""
        async def guarded():
            task = asyncio.ensure_future(make_coro())
            loop = asyncio.get_running_loop()
            deadline = None if self.request_timeout_s is None else loop.time() + self.request_timeout_s
            while True:
                wait_s = self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - loop.time()))
                done, _ = await asyncio.wait({task}, timeout=wait_s)
                if done:
                    return task.result()
                if not self._engine_alive():
                    task.cancel()
                    raise EngineCrashed("SGLang engine processes died during a call")
                if deadline is not None and loop.time() >= deadline:
                    task.cancel()
                    raise EngineCrashed(f"SGLang engine did not answer within {self.request_timeout_s:g} s "
                                        "(rollout.sglang.request_timeout_s): restarting it")

        if self.engine is None or not self._engine_alive():
            raise EngineCrashed("SGLang engine is not running")
        return self.engine.loop.run_until_complete(guarded())

    def _flush(self) -> None:
        """SGLang's flush_cache, retried until it succeeds or `flush_timeout_s` has passed.

        It fails while the scheduler still holds a batch: right after `generate` returned, SGLang's overlap
        scheduler (the default) may still hold the finished one for a moment. Past the deadline: an error
        naming the requests the tokenizer manager still waits on."""
        tm = self.engine.tokenizer_manager
        start = time.monotonic()

        async def flush_until_done():
            delay, attempts = 0.01, 0
            while True:
                attempts += 1
                out = await tm.flush_cache()
                if getattr(out, "success", True):
                    return
                self.flush_retries += 1
                if time.monotonic() - start >= self.flush_timeout_s:
                    pending = sorted(getattr(tm, "rid_to_state", {}))
                    raise RuntimeError(
                        f"SGLang flush_cache still failing after {attempts} attempts in "
                        f"{time.monotonic() - start:.1f} s (rollout.sglang.flush_timeout_s="
                        f"{self.flush_timeout_s:g}): the scheduler still holds requests; pending in the "
                        f"tokenizer manager: {pending[:20] or 'none'}{' ...' if len(pending) > 20 else ''}")
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

        self._call(flush_until_done)
        self._cache_dirty = False

    # ---- RolloutEngine -----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int) -> list[list[Completion]]:
        assert self.is_owner, "generate runs on the engine owner (the group's first rank)"
        request = GenerateRequest(prompts, params, n)
        while True:
            if self.needs_weights:
                self._repush()
            try:
                return group_rows(self._generate_once(request), len(prompts), n)
            except EngineCrashed:
                self.restart()

    def _repush(self) -> None:
        if self.on_restart is None:
            raise EngineRestartedError("the SGLang engine holds dummy weights (started or restarted): "
                                       "push the trainer's weights before generating")
        self.on_restart(self)
        assert not self.needs_weights, "on_restart must push the trainer's weights through update_weights"

    def _generate_once(self, request: GenerateRequest) -> list[Completion]:
        if self._cache_dirty:
            self._flush()
        rows = [request.prompts[i] for i, _ in request.rows()]
        obj = self.backend.io.GenerateReqInput(input_ids=rows, sampling_params=sampling_dicts(request.params, len(rows)),
                                               return_logprob=True)
        outputs = self._call(lambda: self.engine.tokenizer_manager.generate_request(obj, None).__anext__())
        outputs = outputs if isinstance(outputs, list) else [outputs]
        assert len(outputs) == len(rows), (len(outputs), len(rows))
        return [parse_output(out, self.weight_version) for out in outputs]

    def update_weights(self, bucket: list[tuple[str, torch.Tensor]], version: int) -> None:
        """Every rank of the group calls this with its full copy of `bucket` (see sglang_transport).

        CPU tensors (e.g. read from safetensors by rence-eval) are first copied to this rank's GPU.
        """
        if torch.cuda.is_available():
            bucket = [(name, t if t.is_cuda else t.to(torch.cuda.current_device())) for name, t in bucket]
        self.sender.send(bucket, self._submitter(version) if self.is_owner else None)
        self.weight_version = version

    def _submitter(self, version: int) -> Callable[[list], None]:
        def submit(payloads: list) -> None:
            if self._sync_failed:
                return  # the engine died earlier in this sync; the trainer re-syncs after the restart
            obj = self.backend.io.UpdateWeightsFromTensorReqInput(
                serialized_named_tensors=payloads, load_format="flattened_bucket", flush_cache=False,
                weight_version=str(version))
            try:
                success, message = self._call(lambda: self.engine.tokenizer_manager.update_weights_from_tensor(obj, None))
            except EngineCrashed:
                self._sync_failed = True
                self.restart()
                return
            if not success:
                raise RuntimeError(f"SGLang update_weights_from_tensor failed: {message}")
            self._cache_dirty = True
            self.needs_weights = False
        return submit

    def release_memory(self) -> None:
        """Flush the prefix cache, then release weights, KV cache and CUDA graphs.

        Without SGLang's memory saver (always so on CPU) SGLang still runs the same protocol (flush, tag
        bookkeeping, buffer stash) and only the CUDA pause is a no-op: nothing is freed then."""
        if not self.is_owner:
            return
        self._flush()
        tags = [t for t in ALL_TAGS if t not in self._released]
        if tags:
            obj = self.backend.io.ReleaseMemoryOccupationReqInput(tags=tags)
            self._call(lambda: self.engine.tokenizer_manager.release_memory_occupation(obj, None))
            self._released.update(tags)

    def resume_memory(self, tags: Optional[list[str]] = None) -> None:
        """Resume `tags` (None: all released); "kv_cache" brings the CUDA graphs back with it.

        `resume_memory(["kv_cache"])` (or None) ends a weight sync: if the engine crashed during it, the
        restarted engine keeps `needs_weights` (health() False) until the next sync.
        """
        if not self.is_owner:
            return
        wanted = set(ALL_TAGS if tags is None else tags)
        unknown = wanted - set(ALL_TAGS)
        if unknown:
            raise ValueError(f"resume_memory: unknown tags {sorted(unknown)} (known: {list(ALL_TAGS)})")
        if "kv_cache" in wanted:
            wanted.add("cuda_graph")
        todo = [t for t in ALL_TAGS if t in wanted and t in self._released]
        if todo:
            obj = self.backend.io.ResumeMemoryOccupationReqInput(tags=todo)
            self._call(lambda: self.engine.tokenizer_manager.resume_memory_occupation(obj, None))
            self._released.difference_update(todo)
        if "kv_cache" in wanted and self._sync_failed:
            self.needs_weights = True
            self._sync_failed = False
