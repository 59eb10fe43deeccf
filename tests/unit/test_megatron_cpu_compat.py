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
    assert overrides["use_cpu_initialization"] is True
    assert not {"params_dtype", "bf16", "fp16"} & set(overrides)  # the recipe's model.dtype decides, as on GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="patches are for CPU-only machines")
def test_mixed_precision_optimizer_and_offload_on_cpu(fresh_compat):
    """bf16 CPU parameters get megatron's Float16 optimizer with fp32 main params; its RL offload / restore runs
    on CPU (state stays put); restore() gives back the originals."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer import optimizer as mopt

    original_init = mopt.Float16OptimizerWithFloat16Params.__init__
    original_restore = mopt.MegatronOptimizer.restore_from_cpu
    cpu_compat.apply()
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16))
    config = OptimizerConfig(optimizer="adam", lr=0.5, bf16=True, params_dtype=torch.bfloat16)
    opt = mopt.Float16OptimizerWithFloat16Params(torch.optim.Adam([param], lr=0.5), config, None, lambda o, c: None)
    (main,) = opt.fp32_from_float16_groups[0]
    assert main.dtype == torch.float32 and torch.equal(main, param.detach().float()) and param.main_param is main
    with torch.no_grad():
        param.copy_(torch.tensor([3.0, 3.0, 3.0]))
    opt.reload_model_params()  # what Trainer.reload_main_params does after an HF load
    assert torch.equal(main, torch.full((3,), 3.0))
    main.grad = torch.tensor([1.0, -1.0, 0.0])
    opt.optimizer.step()  # the inner Adam updates the fp32 main params (megatron's step adds the TP/DP reductions)
    opt._copy_main_params_to_model_params()  # what megatron's step does next
    assert not torch.equal(main.detach(), torch.full((3,), 3.0))
    assert torch.equal(param.detach(), main.detach().to(torch.bfloat16))  # main params written back
    moments = {k: v.clone() for k, v in opt.optimizer.state[main].items()}
    opt.offload_to_cpu()
    opt.restore_from_cpu()
    assert all(torch.equal(opt.optimizer.state[main][k], v) for k, v in moments.items())
    assert "Float16OptimizerWithFloat16Params.__init__" in cpu_compat.patched()
    cpu_compat.restore()
    assert mopt.Float16OptimizerWithFloat16Params.__init__ is original_init
    assert mopt.MegatronOptimizer.restore_from_cpu is original_restore
    assert param.type() == "torch.BFloat16Tensor"  # Tensor.type is only renamed inside the optimizer's __init__
