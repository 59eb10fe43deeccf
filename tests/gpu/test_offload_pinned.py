"""GPU: the optimizer hand-off into reusable pinned host buffers (megatron/offload.PinnedOffload) is exact, really
pinned, frees the GPU copies and reuses its buffers from one step to the next. Skipped without CUDA (conftest)."""
import pytest
import torch

pytestmark = pytest.mark.gpu

from megatron_rence.megatron.offload import PinnedOffload  # noqa: E402


class _Wrapper:  # the shape of a megatron optimizer the hand-off reads: `.optimizer` is the torch optimizer
    def __init__(self, inner):
        self.optimizer = inner


def test_pinned_round_trip_is_exact_and_reuses_buffers():
    p = torch.nn.Parameter(torch.randn(1024, 1024, device="cuda"))
    opt = torch.optim.Adam([p])
    p.grad = torch.randn_like(p)
    opt.step()
    before = {"p": p.detach().clone(), **{k: v.clone() for k, v in opt.state[p].items() if v.dim()}}
    pinned = PinnedOffload()
    pinned.offload(_Wrapper(opt))
    assert not p.is_cuda and p.data.is_pinned()
    assert all(not v.is_cuda and v.is_pinned() for v in opt.state[p].values() if v.dim())
    ptr = p.data.data_ptr()
    pinned.restore()
    assert p.is_cuda and torch.equal(p.detach(), before["p"])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items() if k != "p")
    pinned.offload(_Wrapper(opt))
    assert p.data.data_ptr() == ptr  # the same pinned buffer, not a new allocation per step
    pinned.restore()
