"""HFEngine on a tiny random Llama (fp32): log-probs vs a teacher-forced pass, greedy, stops, weights, seeds, padding."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rollout.engine import RolloutEngine
from megatron_rence.rollout.hf_engine import HFEngine
from megatron_rence.rollout.types import SamplingParams

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_synthetic_tokenizer()


def make_config(tokenizer, tied=False):
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=tied)


def make_reference(config, seed):
    """A separate transformers model with its own random weights (scaled up so outputs are not near-uniform)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def engine_with(model, tokenizer, config):
    engine = HFEngine(config, tokenizer)
    engine.update_weights(list(model.state_dict().items()), version=3)
    return engine


def teacher_forced(model, prompt, completion, temperature):
    """log_softmax(logits / T) of `completion`'s tokens in one unpadded forward over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    scaled = logits / temperature if temperature > 0 else logits
    logp = torch.log_softmax(scaled, dim=-1)[len(prompt) - 1:-1]
    return logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def prompts(tokenizer):
    return [tokenizer.encode(t) for t in ["1+2=", "12+13=", "7=", "(3+4)*5="]]


@pytest.fixture(scope="module")
def setup(tokenizer):
    config = make_config(tokenizer)
    model = make_reference(config, seed=0)
    return config, model, engine_with(model, tokenizer, config)


def test_is_a_rollout_engine(setup):
    assert isinstance(setup[2], RolloutEngine)


@pytest.mark.parametrize("temperature,top_p,top_k,stop", [(1.0, 1.0, -1, []), (0.7, 0.9, 10, []), (1.3, 1.0, 5, []),
                                                           (1.0, 1.0, -1, ["3", "+"])])
def test_logprobs_equal_teacher_forced_pass(setup, tokenizer, temperature, top_p, top_k, stop):
    config, model, engine = setup
    ps = prompts(tokenizer)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=10, stop=stop, seed=7)
    out = engine.generate(ps, params, n=3)
    assert [len(row) for row in out] == [3] * len(ps)
    if stop:  # rows leave the batch at different steps
        assert {c.finish_reason for row in out for c in row} == {"stop", "length"}
    for prompt, row in zip(ps, out):
        for c in row:
            assert c.weight_version == 3 and len(c.token_ids) == len(c.logprobs) >= 1
            expected = teacher_forced(model, prompt, c.token_ids, temperature)
            assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0), (c.logprobs, expected)


def greedy_reference(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_argmax(setup, tokenizer):
    config, model, engine = setup
    ps = prompts(tokenizer)
    by_temperature = engine.generate(ps, SamplingParams(temperature=0.0, max_new_tokens=6), n=2)
    by_top_k = engine.generate(ps, SamplingParams(temperature=0.8, top_k=1, max_new_tokens=6), n=1)
    for prompt, row, row_k in zip(ps, by_temperature, by_top_k):
        expected = greedy_reference(model, prompt, 6)
        eos = tokenizer.eos_token_id
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        assert row[0].token_ids == row[1].token_ids == row_k[0].token_ids == expected
        # greedy log-probs are those of the unscaled logits (SGLang's convention)
        assert torch.allclose(torch.tensor(row[0].logprobs), teacher_forced(model, prompt, expected, 0.0), atol=1e-4)


def test_eos_ends_with_stop_and_is_kept(tokenizer):
    config = make_config(tokenizer)
    model = make_reference(config, seed=1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # the third generated token becomes eos: bias the lm_head towards eos
        model.lm_head.weight[eos] = 0.0
    engine = engine_with(model, tokenizer, config)
    free = engine.generate(prompts(tokenizer)[:1], SamplingParams(temperature=0.0, max_new_tokens=5), 1)[0][0]
    assert free.finish_reason == "length" and len(free.token_ids) == 5 and eos not in free.token_ids
    with torch.no_grad():
        model.lm_head.weight[eos] = model.model.norm.weight * 50.0
    engine.update_weights([("lm_head.weight", model.lm_head.weight)], version=4)
    c = engine.generate(prompts(tokenizer)[:1], SamplingParams(temperature=0.0, max_new_tokens=5), 1)[0][0]
    assert c.finish_reason == "stop" and c.token_ids[-1] == eos and c.weight_version == 4
    assert eos not in c.token_ids[:-1]
    assert "<eos>" not in c.text


def test_stop_strings_end_sequences(setup, tokenizer):
    config, model, engine = setup
    prompt = prompts(tokenizer)[1]
    free = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12), 1)[0][0]
    pieces = [tokenizer.decode([t]) for t in free.token_ids]
    # the first token whose text has not appeared before it: a one-character stop string
    k = next(i for i in range(1, len(pieces)) if pieces[i] and pieces[i] not in "".join(pieces[:i]))
    c = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=[pieces[k]]), 1)[0][0]
    assert c.finish_reason == "stop"
    assert c.token_ids == free.token_ids[:k + 1]
    assert c.text == "".join(pieces[:k])
    # a stop string spanning two tokens ends at the token completing it
    two = pieces[k - 1] + pieces[k]
    c2 = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=12, stop=["never", two]), 1)[0][0]
    assert c2.token_ids == free.token_ids[:k + 1] and c2.finish_reason == "stop"


@pytest.mark.parametrize("tied", [False, True])
def test_update_weights_reproduces_the_source_model(tokenizer, tied):
    config = make_config(tokenizer, tied=tied)
    source = make_reference(config, seed=2)
    engine = HFEngine(config, tokenizer)  # its own random init
    ps = prompts(tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    before = engine.generate(ps, params, 2)
    items = list(source.state_dict().items())
    assert engine.missing_weights() != []
    engine.update_weights(items[: len(items) // 2], version=1)  # two buckets, like the sync stream
    engine.update_weights(items[len(items) // 2:], version=1)
    assert engine.missing_weights() == []
    after = engine.generate(ps, params, 2)
    assert any(a.token_ids != b.token_ids for ra, rb in zip(after, before) for a, b in zip(ra, rb))
    reference = engine_with(source, tokenizer, config)
    assert [[c.token_ids for c in row] for row in after] == [[c.token_ids for c in row] for row in reference.generate(ps, params, 2)]
    for prompt, row in zip(ps, after):
        for c in row:
            assert torch.allclose(torch.tensor(c.logprobs), teacher_forced(source, prompt, c.token_ids, 1.0), atol=1e-4)
            assert c.weight_version == 1


def test_update_weights_rejects_unknown_names_and_shapes(setup, tokenizer):
    config = setup[0]
    engine = HFEngine(config, tokenizer)
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        engine.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32))], 1)
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        engine.update_weights([("lm_head.weight", torch.zeros(3, 32))], 1)


def test_seed_determinism(setup, tokenizer):
    engine = setup[2]
    ps = prompts(tokenizer)
    run = lambda seed: [[c.token_ids for c in row] for row in engine.generate(
        ps, SamplingParams(temperature=1.0, max_new_tokens=8, seed=seed), 4)]
    assert run(11) == run(11)
    assert run(11) != run(12)
    samples = run(11)[0]
    assert len({tuple(s) for s in samples}) > 1  # the n samples of one prompt differ


def test_batched_left_padding_equals_unbatched(setup, tokenizer):
    engine = setup[2]
    ps = prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    batched = engine.generate(ps, params, 1)
    for prompt, row in zip(ps, batched):
        alone = engine.generate([prompt], params, 1)[0][0]
        assert row[0].token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(row[0].logprobs), torch.tensor(alone.logprobs), atol=1e-5)


def test_length_finish_and_lifecycle(setup, tokenizer):
    engine = HFEngine(setup[0], tokenizer)
    c = engine.generate([[5, 9, 10]], SamplingParams(temperature=1.0, max_new_tokens=1, seed=0), 1)[0][0]
    assert len(c.token_ids) == 1 and c.finish_reason in ("length", "stop")
    engine.release_memory()
    engine.resume_memory(tags=["weights"])
    engine.resume_memory(tags=["kv_cache"])
    assert engine.health()
    engine.shutdown()
    assert not engine.health()
    with pytest.raises(ValueError, match="prompts\\[0\\] is empty"):
        engine.generate([[]], SamplingParams(), 1)
