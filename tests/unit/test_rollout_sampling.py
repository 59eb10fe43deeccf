"""Sampling helpers and request dataclasses: top-k / top-p filters on hand-computed cases, stop strings."""
import math

import pytest
import torch

from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rollout.sampling import StopStrings, filter_logits, sample_next
from megatron_rence.rollout.types import Completion, GenerateRequest, SamplingParams, group_rows


def kept(logits):
    return torch.isfinite(logits).tolist()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert kept(filter_logits(logits, 2, 1.0)) == [[False, True, False, True]]
    assert kept(filter_logits(logits, -1, 1.0)) == [[True] * 4]
    assert kept(filter_logits(logits, 4, 1.0)) == [[True] * 4]


def test_top_p_keeps_the_token_crossing_the_threshold():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    assert kept(filter_logits(logits, -1, 0.6)) == [[False, True, True]]  # 0.5 < 0.6 -> 0.3 kept too
    assert kept(filter_logits(logits, -1, 0.5)) == [[False, True, False]]
    assert kept(filter_logits(logits, -1, 0.81)) == [[True, True, True]]


def test_sample_next_draws_only_from_the_filtered_set_with_full_vocab_logprobs():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.5, top_k=2)
    tokens, lps = sample_next(logits, params, g)
    assert set(tokens.tolist()) == {1, 2}
    full = torch.log_softmax(logits[0] / 0.5, dim=-1)  # not renormalised over the top-k set
    assert torch.allclose(lps, full[tokens])


def test_greedy_logprob_is_of_unscaled_logits():
    logits = torch.tensor([[1.0, 2.0]])
    tokens, lps = sample_next(logits, SamplingParams(temperature=0.0), None)
    assert tokens.tolist() == [1]
    assert lps.item() == pytest.approx(-math.log1p(math.exp(-1.0)))


def test_stop_strings_match_and_trim():
    tok = build_synthetic_tokenizer()
    stop = StopStrings(["=", "12"], tok)
    assert stop.matched(tok.encode("3+4="))
    assert stop.matched(tok.encode("7+12"))
    assert not stop.matched(tok.encode("7+1"))
    assert stop.trim("5+12=3") == "5+"
    assert stop.trim("abc") == "abc"
    assert not StopStrings([], tok)


def test_request_rows_and_grouping():
    req = GenerateRequest([[1], [2, 3]], SamplingParams(), n=2)
    assert req.rows() == [(0, 0), (0, 1), (1, 0), (1, 1)]
    flat = [Completion([i], [0.0], "length", 0) for i in range(4)]
    assert [[c.token_ids[0] for c in row] for row in group_rows(flat, 2, 2)] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("kwargs,key", [({"temperature": -1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                        ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [""]}, "stop")])
def test_sampling_params_validation(kwargs, key):
    with pytest.raises(ValueError, match=f"SamplingParams.{key}"):
        SamplingParams(**kwargs)
