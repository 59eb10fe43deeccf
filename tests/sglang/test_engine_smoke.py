"""Smoke check of the tier itself: SGLang's real `sglang.Engine(device="cpu")` starts on a tiny Llama built
in code (dummy weights) and generates with log-probs, with the import shims and nothing patched."""
import signal

import pytest

pytestmark = pytest.mark.sglang


@pytest.fixture
def sglangs_handlers_undone():
    """sglang.Engine used bare (not through our adapter, which undoes them) leaves its handlers in this process:
    SIGQUIT's launch-phase handler, the tokenizer manager's asyncio SIGTERM handler. Put back what was there."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_shims_are_the_ones_imported():
    import sgl_kernel
    import vllm

    assert sgl_kernel.SHIM and vllm.SHIM
    with pytest.raises(RuntimeError, match="test-only import shim"):
        sgl_kernel.silu_and_mul(None)
    from sgl_kernel.kvcacheio import transfer_kv_all_layer  # submodules import too

    with pytest.raises(RuntimeError, match="test-only import shim"):
        transfer_kv_all_layer()


def test_engine_starts_on_cpu_and_generates(tmp_path, sglangs_handlers_undone):
    import sglang
    from transformers import LlamaConfig

    from megatron_rence.data.tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                architectures=["LlamaForCausalLM"], torch_dtype="float32").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = sglang.Engine(model_path=str(tmp_path), device="cpu", load_format="dummy", dtype="float32",
                           disable_cuda_graph=True, disable_overlap_schedule=True, sleep_on_idle=True,
                           mem_fraction_static=0.05, random_seed=0, log_level="error", skip_server_warmup=True)
    try:
        out = engine.generate(input_ids=[[5, 10, 11], [5, 12]], return_logprob=True,
                              sampling_params={"temperature": 1.0, "max_new_tokens": 4, "ignore_eos": True})
    finally:
        engine.shutdown()
    assert len(out) == 2
    for o in out:
        entries = o["meta_info"]["output_token_logprobs"]
        assert len(entries) == 4 and all(lp <= 0.0 for lp, _, _ in entries)
