"""The real colocated SGLang engine on one GPU: weight push, log-probs vs a transformers pass, memory
release / resume, weight versions, stop signals, crash restart. Skipped without CUDA (conftest) or without sglang."""
import os
import signal

import pytest
import torch

from megatron_rence.config import Config
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rollout.engine import build_engine
from megatron_rence.rollout.mismatch import mismatch_metrics
from megatron_rence.rollout.types import SamplingParams

pytestmark = pytest.mark.gpu
sglang = pytest.importorskip("sglang")


def tiny_model(tokenizer, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
                         rope_theta=10000.0, architectures=["LlamaForCausalLM"])  # SGLang's ServerArgs needs it
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return config, model.to("cuda", torch.bfloat16).eval()


def push(engine, model, version):
    items = [(n, t.detach()) for n, t in model.state_dict().items()]
    engine.resume_memory(["weights"])
    engine.update_weights(items[: len(items) // 2], version)
    engine.update_weights(items[len(items) // 2:], version)
    engine.resume_memory(["kv_cache"])


def teacher_forced(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(completion, device="cuda").unsqueeze(-1)).squeeze(-1).cpu()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer = build_synthetic_tokenizer()
    config, model = tiny_model(tokenizer, seed=0)
    cfg = Config()
    cfg.rollout.engine = "sglang"
    cfg.rollout.sglang.mem_fraction_static = 0.3
    cfg.rollout.sglang.health_poll_s = 1.0
    cfg.model.dtype = "bf16"
    cfg.train.run_dir = str(tmp_path_factory.mktemp("run"))
    engine = build_engine(cfg, config, tokenizer)
    yield tokenizer, config, model, engine
    engine.shutdown()


def test_logprobs_match_transformers_after_a_push(setup):
    tokenizer, config, model, engine = setup
    push(engine, model, version=1)
    assert engine.health()
    prompts = [tokenizer.encode(t) for t in ["1+2=", "12+13=", "(3+4)*5="]]
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=0), n=4)
    assert [len(r) for r in out] == [4, 4, 4]
    rollout, trainer = [], []
    for prompt, row in zip(prompts, out):
        for c in row:
            assert c.weight_version == 1 and len(c.token_ids) == len(c.logprobs) >= 1
            rollout.append(torch.tensor(c.logprobs))
            trainer.append(teacher_forced(model, prompt, c.token_ids, 1.0))
    m = mismatch_metrics(rollout, trainer)
    assert m["mismatch/abs_mean"] < 0.05, m  # bf16 kernels on both sides


def test_release_resume_and_a_new_version(setup):
    tokenizer, config, model, engine = setup
    push(engine, model, version=1)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    prompt = [tokenizer.encode("7+8=")]
    before = engine.generate(prompt, params, 1)[0][0]
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    engine.release_memory()
    assert torch.cuda.mem_get_info()[0] > free_before + 100 * 2**20  # the KV cache pool left the GPU
    _, other = tiny_model(tokenizer, seed=1)
    push(engine, other, version=2)
    after = engine.generate(prompt, params, 1)[0][0]
    assert after.weight_version == 2 and after.token_ids != before.token_ids
    expected = teacher_forced(other, prompt[0], after.token_ids, 1.0)
    assert torch.allclose(torch.tensor(after.logprobs), expected, atol=0.05)


def test_engine_processes_survive_the_jobs_stop_signals(setup):
    """Slurm / kill -- -PGID signal the scheduler and detokenizer too: started with SIGTERM / SIGUSR1 / SIGINT
    blocked, they keep serving until the trainer has checkpointed (issue 16)."""
    import time

    from megatron_rence.lifecycle import STOP_SIGNALS

    tokenizer, config, model, engine = setup
    push(engine, model, version=4)
    restarts = engine.num_restarts
    for pid in engine._pids:
        for sig in STOP_SIGNALS:
            os.kill(pid, sig)
    time.sleep(2.0)
    assert engine.health()
    out = engine.generate([tokenizer.encode("2+2=")], SamplingParams(temperature=0.0, max_new_tokens=4), 1)
    assert engine.num_restarts == restarts and out[0][0].weight_version == 4


def test_restart_after_a_crash_repushes_weights(setup):
    tokenizer, config, model, engine = setup
    push(engine, model, version=3)
    engine.on_restart = lambda e: push(e, model, e.weight_version)
    for pid in engine._pids:  # kill the scheduler and detokenizer processes
        os.kill(pid, signal.SIGKILL)
    out = engine.generate([tokenizer.encode("1+1=")], SamplingParams(temperature=0.0, max_new_tokens=4), 2)
    assert engine.num_restarts == 1 and out[0][0].weight_version == 3 and engine.health()
