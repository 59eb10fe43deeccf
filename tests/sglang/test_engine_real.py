"""Our SGLangEngine adapter over SGLang 0.5.5.post3's REAL engine on CPU (nothing patched): weight push in
flattened buckets, then samples whose log-probs equal the trainer's own; release / resume with SGLang's tags
and a new weight version; stop signals to every engine process; SIGKILL -> restart -> re-push; flush right
after generate (SGLang's default overlap scheduler) many times in a row. (The engine's children keeping the
stop signals blocked when the engine is a fresh interpreter's first spawn: tests/sglang/test_train_sglang.py.)"""
import os
import signal
import time

import pytest
import torch

from megatron_rence.rollout.types import SamplingParams
from tests.megatron_state import single_rank
from tests.sglang.engine_setup import (make_cfg, make_engine, make_trainer, peak, sync, tokenizer_and_vocab,
                                       trainer_logprobs)

pytestmark = pytest.mark.sglang
PROMPTS = ["1+2=", "3+4=", "(2+3)*4="]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizer, vocab = tokenizer_and_vocab()
    cfg = make_cfg(tmp_path_factory.mktemp("run"))
    with single_rank(seed=cfg.train.seed) as pstate:
        trainer = make_trainer(cfg, pstate, vocab)
        engine = make_engine(cfg, tokenizer, vocab)
        try:
            yield tokenizer, vocab, cfg, pstate, trainer, engine
        finally:
            engine.shutdown()


def sample_and_compare(setup, version, temperature=1.0, max_abs=2e-3):
    tokenizer, vocab, cfg, pstate, trainer, engine = setup
    prompts = [tokenizer.encode(t) for t in PROMPTS]
    params = SamplingParams(temperature=temperature, max_new_tokens=6, seed=11)
    out = engine.generate(prompts, params, n=4)
    assert [len(row) for row in out] == [4] * len(prompts)
    ours = trainer_logprobs(trainer, prompts, out, temperature)
    theirs = [torch.tensor(c.logprobs) for row in out for c in row]
    for c in (c for row in out for c in row):
        assert c.weight_version == version and 1 <= len(c.token_ids) == len(c.logprobs) <= 6
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    assert diff < max_abs, f"engine vs trainer log-probs differ by up to {diff}"
    return out


def test_push_then_logprobs_equal_the_trainers(setup):
    tokenizer, vocab, cfg, pstate, trainer, engine = setup
    assert not engine.health()  # dummy weights until the first push
    metrics = sync(engine, trainer, cfg, pstate, vocab, version=1)
    assert metrics["sync/buckets"] >= 3 and engine.health()
    sample_and_compare(setup, version=1)
    sample_and_compare(setup, version=1, temperature=0.7)


def test_release_resume_with_tags_and_a_new_weight_version(setup):
    tokenizer, vocab, cfg, pstate, trainer, engine = setup
    sync(engine, trainer, cfg, pstate, vocab, version=1)
    sample_and_compare(setup, version=1)
    engine.release_memory()  # flush, then every tag through SGLang's scheduler
    assert engine._released == {"weights", "kv_cache", "cuda_graph"}
    peak(trainer, seed=1)  # "training" changed the weights
    sync(engine, trainer, cfg, pstate, vocab, version=2)
    assert engine._released == set()
    sample_and_compare(setup, version=2)  # the engine serves the new weights, tagged with the new version


def test_stop_signals_to_every_engine_process_leave_it_serving(setup):
    tokenizer, vocab, cfg, pstate, trainer, engine = setup
    sync(engine, trainer, cfg, pstate, vocab, version=3)
    assert engine._pids
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        for pid in engine._pids:
            os.kill(pid, sig)
    time.sleep(1.0)
    assert engine.health()
    sample_and_compare(setup, version=3)
    assert engine.num_restarts == 0


def test_sigkill_of_an_engine_process_restarts_and_repushes(setup):
    tokenizer, vocab, cfg, pstate, trainer, engine = setup
    sync(engine, trainer, cfg, pstate, vocab, version=4)
    pushes = []
    engine.on_restart = lambda e: pushes.append(sync(e, trainer, cfg, pstate, vocab, version=4))
    try:
        victim = max(engine._pids)  # the scheduler or the detokenizer
        os.kill(victim, signal.SIGKILL)
        sample_and_compare(setup, version=4)  # the call finds the engine dead, restarts it, re-pushes
    finally:
        engine.on_restart = None
    assert engine.num_restarts == 1 and len(pushes) == 1 and victim not in engine._pids


def test_flush_right_after_generate_with_the_overlap_scheduler(tmp_path):
    """SGLang's default overlap scheduler may still hold the finished batch when generate returns; the
    release's flush_cache then fails (before: one assert aborted the step, 2 of 6 runs)."""
    tokenizer, vocab = tokenizer_and_vocab()
    cfg = make_cfg(tmp_path, overlap=True)
    with single_rank(seed=cfg.train.seed) as pstate:
        trainer = make_trainer(cfg, pstate, vocab)
        engine = make_engine(cfg, tokenizer, vocab)
        try:
            prompts = [tokenizer.encode(t) for t in PROMPTS]
            for version in range(1, 13):
                sync(engine, trainer, cfg, pstate, vocab, version)
                out = engine.generate(prompts, SamplingParams(max_new_tokens=4), n=2)
                assert {c.weight_version for row in out for c in row} == {version}
                engine.release_memory()  # flush_cache at once, then release every tag
            print(f"flush_cache retried {engine.flush_retries} times in 12 releases")
        finally:
            engine.shutdown()
