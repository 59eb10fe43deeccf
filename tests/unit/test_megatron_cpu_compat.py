"""The CPU compatibility layer: a no-op with CUDA, working and reversible patches without it."""
import pytest
import torch

from megatron_rence.megatron import cpu_compat


@pytest.fixture
def fresh_compat():
    """Start unpatched; afterwards leave the layer as this process had it (other tests may rely on it)."""
    was_applied = cpu_compat.is_applied()
    cpu_compat.restore()
    yield
    cpu_compat.restore()
    if was_applied:
        cpu_compat.apply()


def test_apply_is_a_no_op_with_cuda(fresh_compat, monkeypatch):
    original = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # simulate a GPU machine
    assert cpu_compat.apply() is False
    assert not cpu_compat.is_applied() and cpu_compat.patched() == []
    assert torch.cuda.current_device is original
    from megatron.core.transformer import utils as tutils
    assert tutils.torch is torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="patches are for CPU-only machines")
def test_patched_functions_work_on_cpu_and_restore(fresh_compat):
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    originals = {"current_device": torch.cuda.current_device, "synchronize": torch.cuda.synchronize,
                 "clip": clip_grads.clip_grad_by_total_norm_fp32, "tracker_cls": mrandom.CudaRNGStatesTracker}
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is False  # idempotent
    assert "torch.cuda.current_device" in cpu_compat.patched()
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(None)
    # hard-coded device="cuda" inside megatron modules now lands on the CPU
    mask = tutils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.tolist() == torch.triu(torch.ones(4, 4), 1).bool().tolist()
    # a CPU RNG tracker with the CUDA tracker's API
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    tracker = mrandom.get_cuda_rng_tracker()
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.randn(3)
    with tracker.fork():
        b = torch.randn(3)
    assert torch.equal(torch.get_rng_state(), outer)  # forking leaves the default stream alone
    assert not torch.equal(a, b)  # the forked stream advances
    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.randn(3), a)  # re-seeding reproduces
    # gradient clipping without the CUDA-tensor assertion
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=1e-6)

    cpu_compat.restore()
    assert not cpu_compat.is_applied()
    assert torch.cuda.current_device is originals["current_device"]
    assert torch.cuda.synchronize is originals["synchronize"]
    assert clip_grads.clip_grad_by_total_norm_fp32 is originals["clip"]
    assert mrandom.CudaRNGStatesTracker is originals["tracker_cls"]
    assert tutils.torch is torch


def test_cpu_config_overrides_disable_fused_kernels():
    overrides = cpu_compat.cpu_config_overrides()
    for key in ("gradient_accumulation_fusion", "bias_activation_fusion", "masked_softmax_fusion",
                "persist_layer_norm"):
        assert overrides[key] is False
    assert overrides["use_cpu_initialization"] is True and overrides["params_dtype"] == torch.float32
