"""The adapter's arguments and payloads against SGLang 0.5.5.post3's real types (no engine started): ServerArgs
fields, SamplingParams.verify, memory tags, io_struct request dataclasses, FlattenedTensorBucket and
MultiprocessingSerializer. These six ran only where sglang imported (never in CI before this tier)."""
import dataclasses

import pytest
import torch

from megatron_rence.config import SGLangConfig
from megatron_rence.rollout.sglang_engine import ALL_TAGS, sampling_dicts, server_kwargs
from megatron_rence.rollout.sglang_transport import flatten, sglang_payload, sglang_serialize, split_by_dtype
from megatron_rence.rollout.types import SamplingParams
from tests.unit.test_rollout_sglang_engine import make_engine  # noqa: F401  (a pytest fixture)
from tests.unit.test_rollout_sglang_engine import kwargs, sync
from tests.unit.test_rollout_sglang_transport import bucket

pytestmark = pytest.mark.sglang


def test_server_kwargs_are_real_server_args_fields():
    from sglang.srt import server_args

    fields = {f.name for f in dataclasses.fields(server_args.ServerArgs)}
    cpu = server_kwargs(SGLangConfig(deterministic_inference=True), "/m", "fp32", 1, 0, 0, device="cpu")
    for kw in (kwargs(), cpu):
        assert set(kw) <= fields, set(kw) - fields
    assert "dummy" in server_args.LOAD_FORMAT_CHOICES


def test_sampling_dicts_are_valid_sglang_sampling_params():
    from sglang.srt.sampling import sampling_params as sp

    for d in sampling_dicts(SamplingParams(temperature=0.0, top_k=5, stop=["x"], seed=1), 2):
        sp.SamplingParams(**d).verify(100)


def test_tags_match_sglang():
    from sglang.srt import constants

    assert set(ALL_TAGS) == set(constants.GPU_MEMORY_ALL_TYPES)


def test_requests_build_with_real_sglang_dataclasses(make_engine):  # noqa: F811
    from sglang.srt.managers import io_struct

    engine = make_engine(io=io_struct)
    sync(engine, 4)
    engine.release_memory()
    sync(engine, 5)
    assert engine.generate([[3]], SamplingParams(max_new_tokens=1), 2)[0][1].weight_version == 5


def test_matches_sglang_flattened_bucket():
    from sglang.srt.weight_sync import tensor_bucket

    named = split_by_dtype(bucket())[0]
    flat, metas = flatten(named)
    theirs = tensor_bucket.FlattenedTensorBucket(named_tensors=named)
    assert torch.equal(theirs.get_flattened_tensor(), flat)
    assert [vars(m) for m in theirs.get_metadata()] == [vars(m) for m in metas]
    payload = sglang_payload(flat, metas)
    rebuilt = tensor_bucket.FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"],
                                                  metadata=payload["metadata"]).reconstruct_tensors()
    for (n0, t0), (n1, t1) in zip(named, rebuilt):
        assert n0 == n1 and torch.equal(t0, t1)


def test_payload_survives_sglang_serializer():
    from sglang.srt.utils import MultiprocessingSerializer

    named = split_by_dtype(bucket())[1]
    flat, metas = flatten(named)
    data = sglang_serialize(sglang_payload(flat, metas))
    back = MultiprocessingSerializer.deserialize(data)  # SGLang's restricted unpickler admits it
    assert torch.equal(back["flattened_tensor"], flat) and back["metadata"][0].name == named[0][0]


def test_sglang_refuses_deterministic_inference_on_cpu(tmp_path):
    """Why rollout.sglang.deterministic_inference is a ConfigError on CPU (SGLang's check, server_args.py)."""
    from sglang.srt.server_args import ServerArgs
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    ServerArgs(model_path=str(tmp_path), device="cpu", skip_server_warmup=True)  # starts without it
    with pytest.raises(ValueError, match="deterministic inference"):
        ServerArgs(model_path=str(tmp_path), device="cpu", enable_deterministic_inference=True,
                   skip_server_warmup=True)
