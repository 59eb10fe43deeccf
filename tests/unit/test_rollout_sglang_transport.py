"""Flattened weight buckets for SGLang: flatten/unflatten, dtype split, payload planning, gather over gloo;
checked against SGLang's own FlattenedTensorBucket / MultiprocessingSerializer in the `sglang` tier
(tests/sglang/test_adapter_types.py)."""
import pickle

import pytest
import torch

from megatron_rence.rollout.sglang_transport import (BucketSender, TensorMeta, flatten, payload_sources,
                                                     split_by_dtype, unflatten)


def bucket():
    torch.manual_seed(0)
    return [("model.embed_tokens.weight", torch.randn(5, 4)), ("model.norm.weight", torch.randn(4)),
            ("model.layers.0.mlp.up_proj.weight", torch.randn(3, 4).to(torch.bfloat16)),
            ("lm_head.weight", torch.randn(5, 4))]


def test_split_by_dtype_keeps_order():
    groups = split_by_dtype(bucket())
    assert [[n for n, _ in g] for g in groups] == [
        ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"], ["model.layers.0.mlp.up_proj.weight"]]


def test_flatten_metadata_and_inverse():
    named = split_by_dtype(bucket())[0]
    flat, metas = flatten(named)
    assert flat.shape == (20 + 4 + 20,) and flat.dtype == torch.float32
    assert metas[1] == TensorMeta("model.norm.weight", torch.Size([4]), torch.float32, 20, 24, 4)
    assert metas[2].start_idx == 24 and metas[2].end_idx == 44
    back = unflatten(flat, metas)
    for (n0, t0), (n1, t1) in zip(named, back):
        assert n0 == n1 and torch.equal(t0, t1)
    # a new buffer: the producer's tensors can change without touching the payload
    named[0][1].add_(1.0)
    assert not torch.equal(named[0][1], unflatten(flat, metas)[0][1])


def test_flatten_rejects_mixed_dtypes_and_empty():
    with pytest.raises(ValueError, match="one dtype"):
        flatten(bucket())
    with pytest.raises(ValueError, match="empty"):
        flatten([])


def test_payload_sources():
    assert payload_sources(None, 4) == [0, 0, 0, 0]  # the owner's payload for every TP rank (SGLang's own default)
    assert payload_sources(2, 2) == [0, 1]  # TP rank i reads group rank i's own GPU copy
    with pytest.raises(ValueError, match="rollout.sglang.tp=4"):
        payload_sources(2, 4)


def test_sender_without_group_submits_one_payload_per_dtype_and_tp_rank():
    calls = []
    sender = BucketSender(2, None, make_payload=lambda flat, metas: {"flattened_tensor": flat, "metadata": metas},
                          serialize=pickle.dumps)
    sender.send(bucket(), calls.append)
    assert len(calls) == 2 and all(len(c) == 2 and c[0] == c[1] for c in calls)
    received = [t for c in calls for t in unflatten(**{"flat": pickle.loads(c[0])["flattened_tensor"],
                                                          "metas": pickle.loads(c[0])["metadata"]})]
    assert sorted(n for n, _ in received) == sorted(n for n, _ in bucket())
    for name, tensor in bucket():
        assert torch.equal(dict(received)[name], tensor)
    assert sender.bytes_sent == (20 + 4 + 20) * 4 + 12 * 2


def _gather_worker():
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    sender = BucketSender(2, dist.new_group([0, 1]), make_payload=lambda flat, metas: (rank, flat.clone()),
                          serialize=pickle.dumps)
    named = [("w", torch.full((3,), float(rank)))]
    sender.send(named, calls.append if rank == 0 else None)
    return [[pickle.loads(p) for p in c] for c in calls]


@pytest.mark.slow
def test_sender_gathers_each_ranks_payload_to_the_owner_in_rank_order():
    from tests.distributed import launcher

    results = launcher.run(_gather_worker, 2, timeout=120)
    (owner_calls,), other_calls = results[0], results[1]
    assert other_calls == []
    assert [r for r, _ in owner_calls] == [0, 1]
    assert torch.equal(owner_calls[1][1], torch.ones(3)) and torch.equal(owner_calls[0][1], torch.zeros(3))
