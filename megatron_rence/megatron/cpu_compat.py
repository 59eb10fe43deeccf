"""Targeted, reversible patches that let megatron-core run on a CPU-only torch build (gloo, local spec, fp32 or bf16).

megatron-core assumes CUDA in a few dozen places (docs/design.md, "Running megatron-core without CUDA"). Without CUDA,
``apply()`` patches exactly those spots and records every patch so ``restore()`` can undo them:

* ``torch.cuda.current_device()`` is used as ``device=`` in ~40 places: it returns ``torch.device("cpu")``;
* ``torch.cuda.synchronize()`` (p2p communication, DDP) becomes a no-op; ``torch.cuda.current_stream()``
  (newer DDP) returns a stream object whose methods do nothing;
* modules that hard-code ``device="cuda"`` (schedules, optimizer, clip_grads, grad_scaler,
  param_and_grad_buffer, tensor_parallel/data, transformer/utils, core/utils) see a ``torch`` whose tensor
  factories map a CUDA device to the CPU (and drop ``pin_memory``); the rest of torch is untouched;
* the CUDA RNG-states tracker is replaced by one with the same API over the CPU generator, so
  ``model_parallel_cuda_manual_seed`` and activation recomputation work;
* gradient clipping's ``assert grad.type() == 'torch.cuda.FloatTensor'`` is replaced by a CPU version;
* ``LanguageModule.setup_embeddings_and_output_layer`` (tied embeddings under PP) runs with
  ``Tensor.cuda()`` as the identity;
* mixed precision (bf16 / fp16 models): ``Float16OptimizerWithFloat16Params.__init__`` sorts parameters by
  ``param.type() in ['torch.cuda.BFloat16Tensor', ...]`` and raises TypeError for CPU tensors: it runs with
  ``Tensor.type()`` naming a CPU tensor's CUDA counterpart, so bf16 CPU parameters get fp32 main params;
* ``MegatronOptimizer.restore_from_cpu`` (the RL offload) moves state back with ``.cuda()``: on CPU it moves
  it to ``torch.cuda.current_device()`` (= CPU, so nothing moves; ``offload_to_cpu`` already skips
  non-CUDA tensors);
* RoPE's ``get_pos_emb_on_this_cp_rank`` (context parallel) runs with ``Tensor.cuda()`` as the identity;
* pipeline p2p over gloo: with pp=2 both neighbours are the same rank, and gloo matches a pair's messages in
  the order they were posted, so a batched exchange that sends to "prev" and "next" at once (the interleaved
  schedule's steady state) can hand each message to the wrong receive. ``cpu_config_overrides`` turns
  ``batch_p2p_comm`` off, so tensors go through megatron's ``_p2p_ops`` (one process group per direction when
  pp=2), and the shape handshake of ``variable_seq_lengths`` (packed microbatches) is patched to use
  ``_p2p_ops`` as well.

``apply()`` is a no-op when ``torch.cuda.is_available()``. The model config needs CPU settings as well:
see ``cpu_config_overrides()``.
"""
from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any, Callable, Optional

import torch

# Modules that hard-code device="cuda" in tensor factories (megatron-core 0.16; missing ones are skipped).
_CUDA_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rope_utils",
)
# Modules that import rope_utils.get_pos_emb_on_this_cp_rank by name (context parallel RoPE: pinned memory + .cuda()).
_ROPE_CP_MODULES = ("megatron.core.models.common.embeddings.rope_utils",
                    "megatron.core.models.common.embeddings.rotary_pos_embedding",
                    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding")
# Tensor factories whose `device=` argument is rewritten in those modules.
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "zeros_like",
              "ones_like", "empty_like", "full_like", "as_tensor")
# Modules that import clip_grad_by_total_norm_fp32 by name.
_CLIP_MODULES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer",
                 "megatron.core.optimizer")

_patches: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) in application order
_MISSING = object()


def is_applied() -> bool:
    return bool(_patches)


def cpu_config_overrides() -> dict:
    """TransformerConfig fields a CPU run needs (no fused CUDA kernels, CPU init); the dtype is the recipe's."""
    return dict(gradient_accumulation_fusion=False, bias_activation_fusion=False,
                masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
                apply_rope_fusion=False, use_cpu_initialization=True, batch_p2p_comm=False)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__wrapped__ = fn
    return factory


class CpuTorch(types.ModuleType):
    """Stands in for `torch` inside one megatron module: CUDA devices in tensor factories become CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):  # everything else is the real torch
        return getattr(torch, name)


class _NullStream:
    """What `torch.cuda.current_stream()` returns on CPU: every stream operation is a no-op."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _current_device():
    return torch.device("cpu")


def _synchronize(device=None):
    return None


def _current_stream(device=None):
    return _NullStream()


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base: type) -> type:
    """A subclass of megatron's CudaRNGStatesTracker whose named states are CPU generator states."""

    class CpuRNGStatesTracker(base):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad: bool = False):
    """CPU version of megatron's function of the same name (no CUDA-tensor assertion): scales grads in place."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for grad in grads:
            grad.detach().mul_(clip_coeff)


def _without_cuda_copies(fn: Callable) -> Callable:
    """Run `fn` with `Tensor.cuda()` returning the tensor itself (for methods that move weights to the GPU)."""

    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    wrapper.__wrapped__ = fn
    return wrapper


def _with_cuda_type_names(fn: Callable) -> Callable:
    """Run `fn` with `Tensor.type()` (no arguments) of a CPU tensor returning its CUDA name
    ("torch.BFloat16Tensor" -> "torch.cuda.BFloat16Tensor"): megatron sorts parameters by those names."""

    def wrapper(*args, **kwargs):
        original = torch.Tensor.type

        def type_(self, *a, **k):
            name = original(self, *a, **k)
            if a or k or self.device.type != "cpu":
                return name
            return name.replace("torch.", "torch.cuda.", 1)

        torch.Tensor.type = type_
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = original

    wrapper.__wrapped__ = fn
    return wrapper


def _restore_from_cpu(self) -> None:
    """megatron's MegatronOptimizer.restore_from_cpu with `.cuda()` replaced by the current device (CPU)."""
    if getattr(self, "optimizer", None) is None or getattr(self, "is_stub_optimizer", False):
        return
    device = torch.cuda.current_device()
    for group in self.optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, torch.Tensor):
                p.data = p.data.to(device)
    for state in self.optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                state[key] = value.to(device)


_SHAPE_TAG = 7  # shape messages travel apart from the tensors (tag 0)


def _communicate_shapes(self, tensor_send_next, tensor_send_prev, recv_prev: bool, recv_next: bool):
    """P2PCommunicator._communicate_shapes (variable_seq_lengths) on gloo: megatron's `_p2p_ops` order and
    per-direction groups (so a shape sent "prev" never meets a receive from "next" when pp=2), and a tag of
    its own, so that shape and tensor messages form separate streams (one side's combined call may match two
    calls on the other; with a shared stream a shape would then meet a tensor receive)."""
    import torch.distributed as dist

    group = self.pp_group
    other = dist.group.WORLD if group.size() == 2 else group
    shape = lambda t: None if t is None else torch.tensor(t.size(), dtype=torch.int64)  # noqa: E731
    recv_prev_shape = torch.empty(3, dtype=torch.int64) if recv_prev else None
    recv_next_shape = torch.empty(3, dtype=torch.int64) if recv_next else None
    send_next, send_prev = shape(tensor_send_next), shape(tensor_send_prev)
    even = group.rank() % 2 == 0
    ops = [  # (op, tensor, peer, group) in _p2p_ops' order for this rank's parity
        (dist.isend, send_next, self.next_rank, group if even else other),
        (dist.irecv, recv_prev_shape, self.prev_rank, other if even else group),
        (dist.isend, send_prev, self.prev_rank, group if even else other),
        (dist.irecv, recv_next_shape, self.next_rank, other if even else group),
    ]
    if not even:
        ops = [ops[1], ops[0], ops[3], ops[2]]
    reqs = [op(tensor, peer, group=g, tag=_SHAPE_TAG) for op, tensor, peer, g in ops if tensor is not None]
    for req in reqs:
        req.wait()
    return ([0, 0, 0] if recv_prev_shape is None else recv_prev_shape.tolist(),
            [0, 0, 0] if recv_next_shape is None else recv_next_shape.tolist())


def _patch(owner, name: str, value) -> None:
    _patches.append((owner, name, getattr(owner, name, _MISSING)))
    setattr(owner, name, value)


def _import(name: str) -> Optional[types.ModuleType]:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def apply(force: bool = False) -> bool:
    """Patch megatron-core for CPU. No-op (returns False) with CUDA present unless `force`; idempotent."""
    if _patches or (torch.cuda.is_available() and not force):
        return False
    _patch(torch.cuda, "current_device", _current_device)
    _patch(torch.cuda, "synchronize", _synchronize)
    _patch(torch.cuda, "current_stream", _current_stream)

    cpu_torch = CpuTorch()
    for name in _CUDA_DEVICE_MODULES:
        module = _import(name)
        if module is not None and getattr(module, "torch", None) is torch:
            _patch(module, "torch", cpu_torch)

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    _patch(random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _patch(random, "_set_cuda_rng_state", _cpu_set_rng_state)
    _patch(random, "CudaRNGStatesTracker", _make_cpu_tracker_class(random.CudaRNGStatesTracker))
    # A tracker created before apply() is a CUDA one: drop it so the next seeding builds a CPU one.
    _patch(random, "_CUDA_RNG_STATE_TRACKER", None)
    _patch(random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False)

    # tied embeddings under PP: `weight.data.cuda()` before the first/last-stage all-reduce
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    owner = language_module.LanguageModule
    _patch(owner, "setup_embeddings_and_output_layer", _without_cuda_copies(owner.setup_embeddings_and_output_layer))

    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    fp16 = optimizer.Float16OptimizerWithFloat16Params
    _patch(fp16, "__init__", _with_cuda_type_names(fp16.__init__))
    _patch(optimizer.MegatronOptimizer, "restore_from_cpu", _restore_from_cpu)

    rope_cp = _without_cuda_copies(importlib.import_module(_ROPE_CP_MODULES[0]).get_pos_emb_on_this_cp_rank)
    for name in _ROPE_CP_MODULES:
        module = _import(name)
        if module is not None and hasattr(module, "get_pos_emb_on_this_cp_rank"):
            _patch(module, "get_pos_emb_on_this_cp_rank", rope_cp)

    p2p = importlib.import_module("megatron.core.pipeline_parallel.p2p_communication")
    _patch(p2p.P2PCommunicator, "_communicate_shapes", _communicate_shapes)

    for name in _CLIP_MODULES:
        module = _import(name)
        if module is not None and hasattr(module, "clip_grad_by_total_norm_fp32"):
            _patch(module, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    return True


def restore() -> None:
    """Undo every patch made by `apply()`, last first."""
    while _patches:
        owner, name, original = _patches.pop()
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


def patched() -> list[str]:
    """Human-readable list of what `apply()` patched ("module.attribute")."""
    return [f"{getattr(owner, '__name__', type(owner).__name__)}.{name}" for owner, name, _ in _patches]
