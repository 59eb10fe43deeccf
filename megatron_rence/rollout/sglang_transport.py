"""Weight transport to a colocated SGLang engine: flattened buckets over CUDA IPC, one payload per engine TP rank.

Written against SGLang 0.5.5.post3 (the Dockerfile's pin; read from its wheel):
`sglang.srt.weight_sync.tensor_bucket.FlattenedTensorBucket / FlattenedTensorMetadata`,
`sglang.srt.utils.MultiprocessingSerializer`, `sglang.srt.utils.patch_torch.monkey_patch_torch_reductions`,
and `ModelRunner._update_weights_from_flattened_bucket`, which expects each TP worker's entry of
`serialized_named_tensors` to deserialize to ``{"flattened_tensor": Tensor, "metadata": [FlattenedTensorMetadata]}``.

One call of `BucketSender.send(bucket, version, submit)` on every rank of one engine's group::

    bucket --split by dtype--> sub-bucket --flatten (one buffer, this rank's GPU)--> payload
        --MultiprocessingSerializer (CUDA IPC handle)--> gather to the group's rank 0 (the engine owner)
        --owner: submit([payload of group rank 0, 1, ..., tp-1])   (engine TP rank i reads entry i)
        --barrier: the engine has copied every buffer; only now may producers free or reuse them

Without a group (one process feeds the engine), the owner's single payload is repeated for every TP
rank, as SGLang's own Engine.update_weights_from_tensor does: each TP worker opens the owner's GPU
buffer and copies from it (peer-to-peer).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

NamedTensors = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a flattened bucket; the fields of SGLang's FlattenedTensorMetadata."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def split_by_dtype(bucket: NamedTensors) -> list[NamedTensors]:
    """Sub-buckets of one dtype each (a flattened bucket is one tensor), in order of first appearance."""
    groups: dict[torch.dtype, NamedTensors] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def flatten(named: NamedTensors) -> tuple[torch.Tensor, list[TensorMeta]]:
    """Copy same-dtype tensors into one new 1-D buffer [sum numel] on their device, with their offsets."""
    if not named:
        raise ValueError("flatten: empty bucket")
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        raise ValueError(f"flatten: one dtype per flattened bucket, got {sorted(map(str, dtypes))}")
    metas, offset = [], 0
    for name, tensor in named:
        metas.append(TensorMeta(name, tensor.shape, tensor.dtype, offset, offset + tensor.numel(), tensor.numel()))
        offset += tensor.numel()
    flat = torch.empty(offset, dtype=named[0][1].dtype, device=named[0][1].device)
    for (_, tensor), meta in zip(named, metas):
        flat[meta.start_idx:meta.end_idx].copy_(tensor.reshape(-1))
    return flat, metas


def unflatten(flat: torch.Tensor, metas: list[TensorMeta]) -> NamedTensors:
    """The inverse of `flatten`: views into `flat` with the original names and shapes."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.shape)) for m in metas]


def sglang_payload(flat: torch.Tensor, metas: list[TensorMeta]) -> dict:
    """The object SGLang's flattened-bucket loader deserializes (its own metadata class: its unpickler
    only admits classes from sglang modules)."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    return {"flattened_tensor": flat, "metadata": [FlattenedTensorMetadata(**asdict(m)) for m in metas]}


def sglang_serialize(payload: dict) -> bytes:
    """MultiprocessingSerializer: a CUDA tensor becomes an IPC handle, its device named by UUID through
    SGLang's patch of torch's reductions (process-wide, as in SGLang's workers; it only handles CUDA
    tensors, so it is applied only for them)."""
    from sglang.srt.utils import MultiprocessingSerializer

    if payload["flattened_tensor"].is_cuda:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    return MultiprocessingSerializer.serialize(payload)


def payload_sources(group_size: Optional[int], engine_tp: int) -> list[int]:
    """Which group rank's payload each engine TP rank reads: i -> i with a group, else all -> 0."""
    if group_size is None:
        return [0] * engine_tp
    if group_size != engine_tp:
        raise ValueError(f"rollout.sglang.tp={engine_tp} but the engine's process group has {group_size} ranks")
    return list(range(engine_tp))


class BucketSender:
    """Feeds one engine from the ranks of its group (or from the owner alone with `group=None`).

    `make_payload(flat, metas)` and `serialize(obj)` default to SGLang's (see module docstring);
    tests substitute plain ones because SGLang cannot run on CPU.
    """

    def __init__(self, engine_tp: int, group=None, make_payload: Callable = sglang_payload,
                 serialize: Callable = sglang_serialize):
        self.group = group
        self.group_size = dist.get_world_size(group) if group is not None else None
        self.rank = dist.get_rank(group) if group is not None else 0
        self.sources = payload_sources(self.group_size, engine_tp)
        self.make_payload = make_payload
        self.serialize = serialize
        self.bytes_sent = 0

    @property
    def is_owner(self) -> bool:
        return self.rank == 0

    def send(self, bucket: NamedTensors, submit: Optional[Callable[[list], None]]) -> None:
        """Every rank calls this with its own full copy of `bucket`; `submit(payloads)` runs on the owner.

        `submit` returns only after the engine has loaded the bucket (SGLang's call does) and must not
        raise for a recoverable failure (the engine records it instead): the other ranks wait at the barrier.
        """
        assert self.is_owner == (submit is not None), "exactly the owner submits"
        for named in split_by_dtype(bucket):
            flat, metas = flatten(named)
            payload = self.serialize(self.make_payload(flat, metas))
            payloads = self._gather(payload)
            if self.is_owner:
                submit([payloads[i] for i in self.sources])
            if self.group is not None:
                dist.barrier(group=self.group)  # the engine finished copying: producers may free `flat`
            self.bytes_sent += flat.numel() * flat.element_size()
            del flat, payload, payloads

    def _gather(self, payload) -> Optional[list]:
        if self.group is None:
            return [payload]
        out = [None] * self.group_size if self.is_owner else None
        dist.gather_object(payload, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out
