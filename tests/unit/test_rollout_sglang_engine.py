"""SGLangEngine logic on CPU: server / sampling arguments, output parsing, the weight / memory protocol and
crash-restart, driven through a FAKE sglang Engine defined here (SGLang needs CUDA and cannot run in this
test tier; tests/gpu/test_sglang_engine.py runs the real one on a GPU, the `sglang` tier (tests/sglang/) on
CPU, where the arguments are also checked against SGLang's real ServerArgs, SamplingParams and request
dataclasses: tests/sglang/test_adapter_types.py)."""
import asyncio
import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_rence.config import Config, SGLangConfig
from megatron_rence.lifecycle import STOP_SIGNALS
from megatron_rence.rollout.engine import RolloutEngine
from megatron_rence.rollout.sglang_engine import (ALL_TAGS, Backend, EngineRestartedError, SGLangEngine,
                                                  parse_output, sampling_dicts, server_kwargs)
from megatron_rence.rollout.sglang_transport import unflatten
from megatron_rence.rollout.types import SamplingParams


# ---- the fake: the parts of sglang.Engine / TokenizerManager the adapter uses ---------------------------
@dataclasses.dataclass
class Req:  # stands in for every io_struct request dataclass when sglang is not importable
    kwargs: dict

    def __getattr__(self, name):
        return self.kwargs[name]


FAKE_IO = SimpleNamespace(**{name: (lambda **kw: Req(kw)) for name in (
    "GenerateReqInput", "UpdateWeightsFromTensorReqInput", "ReleaseMemoryOccupationReqInput",
    "ResumeMemoryOccupationReqInput")})


class FakeTokenizerManager:
    def __init__(self, engine):
        self.engine = engine

    def auto_create_handle_loop(self):  # like SGLang: installs process-killing handlers on the loop
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            self.engine.loop.add_signal_handler(sig, lambda: os._exit(17))

    async def _maybe_die(self, what):
        if self.engine.die_on == what:
            self.engine.proc.kill()
            await asyncio.sleep(3600)
        if self.engine.hang_on == what:  # alive but never answers
            await asyncio.sleep(3600)

    async def generate_request(self, obj, request):
        await self._maybe_die("generate")
        outs = []
        for ids, sp in zip(obj.input_ids, obj.sampling_params):
            tokens = [(ids[-1] + k + 1) % 50 for k in range(sp["max_new_tokens"])]
            outs.append({"text": "x" * len(tokens), "output_ids": tokens, "meta_info": {
                "id": "r", "finish_reason": {"type": "length", "length": len(tokens)},
                "weight_version": self.engine.weight_version,
                "output_token_logprobs": [(-0.25 * (k + 1), t, None) for k, t in enumerate(tokens)]}})
        yield outs

    async def update_weights_from_tensor(self, obj, request):
        await self._maybe_die("update")
        assert obj.load_format == "flattened_bucket" and obj.flush_cache is False
        assert len(obj.serialized_named_tensors) == self.engine.kwargs["tp_size"]
        payload = pickle.loads(obj.serialized_named_tensors[0])
        self.engine.weights.update(unflatten(payload["flattened_tensor"], payload["metadata"]))
        self.engine.weight_version = obj.weight_version
        return True, "Success"

    async def flush_cache(self):
        self.engine.log.append("flush")
        if self.engine.flush_failures > 0:  # SGLang's scheduler still holds a batch: success=False
            self.engine.flush_failures -= 1
            return SimpleNamespace(success=False)
        return SimpleNamespace(success=True)

    async def release_memory_occupation(self, obj, request):
        self.engine.log.append(("release", tuple(obj.tags)))
        self.engine.offload_tags.update(obj.tags)

    async def resume_memory_occupation(self, obj, request):
        self.engine.log.append(("resume", tuple(obj.tags)))
        for tag in obj.tags:
            self.engine.offload_tags.remove(tag)  # KeyError on a tag never released, as in SGLang


class FakeEngine:
    started: list = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        # a child with Python's default signal handling, like SGLang's scheduler / detokenizer processes
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.tokenizer_manager = FakeTokenizerManager(self)
        self.weights, self.log, self.offload_tags = {}, [], set()
        self.weight_version, self.die_on, self.hang_on = "default", None, None
        self.flush_failures = 0
        self.tokenizer_manager.rid_to_state = {}
        FakeEngine.started.append(self)

    def shutdown(self):
        raise AssertionError("the adapter must not call Engine.shutdown (it kills every child process)")


def kwargs(tp=1, memory_saver=True):
    s = SGLangConfig(tp=tp, enable_memory_saver=memory_saver)
    return server_kwargs(s, "/tmp/model", "bf16", 1, 0, 0)


@pytest.fixture
def make_engine():
    engines = []

    def make(tp=1, memory_saver=True, io=FAKE_IO, request_timeout_s=None, flush_timeout_s=60.0):
        def serialize(payload):
            return pickle.dumps(payload)
        engine = SGLangEngine(kwargs(tp, memory_saver), backend=Backend(FakeEngine, io), max_restarts=2, poll_s=0.02,
                              make_payload=lambda flat, metas: {"flattened_tensor": flat, "metadata": metas},
                              serialize=serialize, request_timeout_s=request_timeout_s,
                              flush_timeout_s=flush_timeout_s)
        engines.append(engine)
        return engine

    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGQUIT)
    yield make
    for engine in engines:
        engine.shutdown()
    signal.signal(signal.SIGTERM, saved[0])
    signal.signal(signal.SIGQUIT, saved[1])


def weights():
    return [("model.norm.weight", torch.arange(4.0)), ("lm_head.weight", torch.ones(3, 4))]


def sync(engine, version):
    """The trainer's per-step protocol (train.sync_weights)."""
    engine.resume_memory(["weights"])
    engine.update_weights(weights(), version)
    engine.resume_memory(["kv_cache"])


# ---- pure argument building --------------------------------------------------------------------------
def test_server_kwargs_from_the_recipe():
    s = SGLangConfig(tp=2, mem_fraction_static=0.42, base_port=31000,
                     extra_args={"disable_cuda_graph": "true", "chunked_prefill_size": "4096", "attention_backend": "fa3"})
    kw = server_kwargs(s, "/m", "bf16", 7, base_gpu_id=2, engine_on_node=1)
    assert "device" not in kw and "enable_deterministic_inference" not in kw
    assert kw["load_format"] == "dummy" and kw["enable_memory_saver"] is True and kw["dtype"] == "bfloat16"
    assert (kw["tp_size"], kw["base_gpu_id"], kw["mem_fraction_static"], kw["random_seed"]) == (2, 2, 0.42, 7)
    assert (kw["port"], kw["nccl_port"]) == (31100, 31101)  # engine 1 of its node
    assert kw["disable_cuda_graph"] is True and kw["chunked_prefill_size"] == 4096 and kw["attention_backend"] == "fa3"
    assert kw["model_path"] == kw["tokenizer_path"] == "/m"


def test_server_kwargs_on_cpu_and_deterministic():
    s = SGLangConfig(deterministic_inference=True)
    kw = server_kwargs(s, "/m", "fp32", 7, base_gpu_id=3, engine_on_node=0, device="cpu")
    assert kw["enable_deterministic_inference"] is True
    assert (kw["device"], kw["base_gpu_id"], kw["enable_memory_saver"], kw["disable_cuda_graph"],
            kw["sleep_on_idle"]) == ("cpu", 0, False, True, True)



def test_sampling_dicts():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop=["</s>"], seed=3)
    rows = sampling_dicts(params, 3)
    assert rows[0] == dict(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop=["</s>"],
                           sampling_seed=rows[0]["sampling_seed"])
    assert len({r["sampling_seed"] for r in rows}) == 3  # samples of one prompt must not share a seed
    assert sampling_dicts(params, 3) == rows
    assert "sampling_seed" not in sampling_dicts(SamplingParams(), 1)[0]
    assert sampling_dicts(SamplingParams(), 1)[0]["stop"] is None
    # ours disables top-k with any value <= 0, SGLang only with -1 (it rejects 0)
    assert [sampling_dicts(SamplingParams(top_k=k), 1)[0]["top_k"] for k in (0, -1, 7)] == [-1, -1, 7]



def test_parse_output():
    out = {"text": "ab", "output_ids": [5, 2], "meta_info": {
        "id": "1", "finish_reason": {"type": "stop", "matched": 2}, "weight_version": "7",
        "output_token_logprobs": [(-0.5, 5, None), (-1.5, 2, None)]}}
    c = parse_output(out, fallback_version=0)
    assert (c.token_ids, c.logprobs, c.finish_reason, c.weight_version, c.text) == ([5, 2], [-0.5, -1.5], "stop", 7, "ab")
    out["meta_info"]["weight_version"] = "default"
    assert parse_output(out, fallback_version=4).weight_version == 4
    out["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(RuntimeError, match="abort"):
        parse_output(out, 0)



# ---- the protocol through the fake engine --------------------------------------------------------------
def test_weights_then_generate(make_engine):
    engine = make_engine(tp=2)
    assert isinstance(engine, RolloutEngine)
    fake = FakeEngine.started[-1]
    assert fake.kwargs["load_format"] == "dummy" and fake.kwargs["tp_size"] == 2
    assert not engine.health()  # dummy weights
    with pytest.raises(EngineRestartedError):
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=2), 1)
    sync(engine, version=5)
    assert engine.health() and fake.weight_version == "5"
    assert torch.equal(fake.weights["model.norm.weight"], torch.arange(4.0))
    out = engine.generate([[1, 2], [7]], SamplingParams(max_new_tokens=3, seed=0), n=2)
    assert [len(r) for r in out] == [2, 2]
    assert out[1][0].token_ids == [8, 9, 10] and out[1][0].logprobs == [-0.25, -0.5, -0.75]
    assert out[0][1].weight_version == 5 and out[0][1].finish_reason == "length"
    assert fake.log[0] == "flush"  # weights changed since the last flush: the prefix cache goes first


def test_release_and_resume_tags(make_engine):
    engine = make_engine()
    fake = FakeEngine.started[-1]
    sync(engine, 1)
    fake.log.clear()
    engine.release_memory()
    assert fake.log == ["flush", ("release", ALL_TAGS)]
    engine.resume_memory(["weights"])
    engine.update_weights(weights(), 2)
    engine.resume_memory(["kv_cache"])
    engine.resume_memory(["kv_cache"])  # nothing released any more: no call (SGLang would raise)
    assert fake.log[2:] == [("resume", ("weights",)), ("resume", ("kv_cache", "cuda_graph"))]
    assert fake.offload_tags == set()
    with pytest.raises(ValueError, match="unknown tags"):
        engine.resume_memory(["kv"])


def test_memory_calls_run_the_same_protocol_without_memory_saver(make_engine):
    """Without the memory saver (always on CPU) SGLang still flushes, keeps its tags and stashes buffers on
    release; only the CUDA pause is a no-op. The adapter sends the same calls, so the CPU tier drives them."""
    engine = make_engine(memory_saver=False)
    fake = FakeEngine.started[-1]
    engine.release_memory()
    engine.resume_memory()
    assert fake.log == ["flush", ("release", ALL_TAGS), ("resume", ALL_TAGS)]


def test_flush_is_retried_while_the_scheduler_holds_a_batch(make_engine):
    engine = make_engine()
    fake = FakeEngine.started[-1]
    sync(engine, 1)
    engine.generate([[1]], SamplingParams(max_new_tokens=1), 1)
    fake.log.clear()
    fake.flush_failures = 3  # SGLang's overlap scheduler right after generate
    engine.release_memory()
    assert fake.log == ["flush"] * 4 + [("release", ALL_TAGS)] and engine.flush_retries == 3


def test_flush_gives_up_at_its_deadline_naming_the_pending_requests(make_engine):
    engine = make_engine(flush_timeout_s=0.3)
    fake = FakeEngine.started[-1]
    sync(engine, 1)
    fake.flush_failures = 10**9
    fake.tokenizer_manager.rid_to_state = {"req-b": None, "req-a": None}
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"flush_timeout_s=0.3.*\['req-a', 'req-b'\]"):
        engine.release_memory()
    assert time.monotonic() - start < 10  # bounded (the deadline is 0.3 s; slack for a loaded machine)
    assert 2 <= fake.log.count("flush")


def test_signal_handlers(make_engine):
    def trainer_handler(signum, frame):
        pass

    signal.signal(signal.SIGTERM, trainer_handler)
    engine = make_engine()
    assert signal.getsignal(signal.SIGTERM) is trainer_handler  # checkpoint-on-SIGTERM survives the engine
    sync(engine, 1)
    os.kill(os.getpid(), signal.SIGQUIT)  # what a failing SGLang child sends its parent
    assert not engine.health()


def test_engine_processes_survive_the_jobs_stop_signals(make_engine):
    """Slurm / kill -- -PGID signal the engine's processes too: started with the stop signals blocked, they
    live on until the trainer has checkpointed (before, the next engine call raised before the save)."""
    engine = make_engine()
    sync(engine, 1)
    child = FakeEngine.started[-1].proc
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []).isdisjoint(STOP_SIGNALS)  # the trainer's mask is back
    for sig in STOP_SIGNALS:
        os.kill(child.pid, sig)
    time.sleep(0.5)
    assert child.poll() is None and engine.health()
    assert engine.generate([[1]], SamplingParams(max_new_tokens=2), 1)[0][0].weight_version == 1
    assert engine.num_restarts == 0


def test_a_hung_engine_is_restarted_after_request_timeout(make_engine):
    engine = make_engine(request_timeout_s=0.3)
    engine.on_restart = lambda e: sync(e, e.weight_version)
    sync(engine, 3)
    first = FakeEngine.started[-1]
    first.hang_on = "generate"
    out = engine.generate([[1]], SamplingParams(max_new_tokens=2), 1)
    assert FakeEngine.started[-1] is not first and engine.num_restarts == 1
    assert first.proc.poll() is not None  # the hung engine's processes were killed
    assert out[0][0].weight_version == 3 and engine.health()


def test_request_timeout_is_validated():
    from megatron_rence.config import ConfigError, validate

    cfg = Config()
    cfg.rollout.sglang.request_timeout_s = 0
    with pytest.raises(ConfigError, match="rollout.sglang.request_timeout_s"):
        validate(cfg)


def test_crash_during_generate_restarts_and_repushes(make_engine):
    engine = make_engine()
    pushed = []
    engine.on_restart = lambda e: (pushed.append(e.weight_version), sync(e, e.weight_version))
    sync(engine, 3)
    first = FakeEngine.started[-1]
    first.die_on = "generate"
    out = engine.generate([[1]], SamplingParams(max_new_tokens=2), 1)
    second = FakeEngine.started[-1]
    assert second is not first and engine.num_restarts == 1 and pushed == [3]
    assert out[0][0].weight_version == 3 and second.weight_version == "3"
    assert first.proc.poll() is not None  # the dead engine's processes were reaped
    assert engine.health()


def test_crash_without_callback_asks_the_trainer(make_engine):
    engine = make_engine()
    sync(engine, 3)
    FakeEngine.started[-1].die_on = "generate"
    with pytest.raises(EngineRestartedError):
        engine.generate([[1]], SamplingParams(max_new_tokens=2), 1)
    assert not engine.health() and engine.num_restarts == 1
    sync(engine, 3)  # the trainer re-syncs collectively; no training state involved
    assert engine.health()
    assert engine.generate([[1]], SamplingParams(max_new_tokens=1), 1)[0][0].weight_version == 3


def test_crash_during_sync_skips_the_rest_and_stays_unhealthy(make_engine):
    engine = make_engine()
    sync(engine, 1)
    FakeEngine.started[-1].die_on = "update"
    engine.resume_memory(["weights"])
    engine.update_weights(weights()[:1], 2)
    engine.update_weights(weights()[1:], 2)  # skipped: the restarted engine must get a full sync
    engine.resume_memory(["kv_cache"])
    assert engine.num_restarts == 1 and not engine.health() and FakeEngine.started[-1].weights == {}
    sync(engine, 2)
    assert engine.health()


def test_gives_up_after_max_restarts(make_engine):
    engine = make_engine()
    engine.on_restart = lambda e: (sync(e, 1), setattr(FakeEngine.started[-1], "die_on", "generate"))
    sync(engine, 1)
    FakeEngine.started[-1].die_on = "generate"
    with pytest.raises(RuntimeError, match="max_restarts=2"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1), 1)
    assert engine.num_restarts == 2



def test_build_engine_dispatch(tmp_path):
    from megatron_rence.rollout.engine import build_engine

    cfg = Config()
    cfg.rollout.engine = "vllm"
    with pytest.raises(ValueError, match="rollout.engine"):
        build_engine(cfg, None, None)


def test_fp8_weights_with_partial_blocks_fail_before_the_engine_starts():
    from megatron_rence.config import ConfigError, ModelConfig
    from megatron_rence.rollout.sglang_engine import SGLangEngine

    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2)
    cfg.rollout.engine, cfg.rollout.sglang.fp8_weights = "sglang", True
    with pytest.raises(ConfigError, match=r"rollout.sglang.fp8_weights: .*q_proj rows per engine rank = 64"):
        SGLangEngine.from_config(cfg, hf_config=None, tokenizer=None)


def test_deterministic_inference_on_cpu_fails_before_the_engine_starts():
    from megatron_rence.config import ConfigError

    cfg = Config()
    cfg.rollout.engine, cfg.rollout.sglang.deterministic_inference, cfg.train.device = "sglang", True, "cpu"
    with pytest.raises(ConfigError, match=r"rollout.sglang.deterministic_inference=true needs .*torch_native"):
        SGLangEngine.from_config(cfg, hf_config=None, tokenizer=None)
