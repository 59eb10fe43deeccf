"""Weight-sync cost model (planning/sync_cost.py): hand-summed bytes per rank, the CPU engine's minimal traffic,
feed ranks equal to phases', and the 70B recipe's figures in rence-plan (goal: under 10 s, no rank sending more
than the model's bytes per sync); the whole sync phase (planning/sync_phase.py) term by term by hand, and the
70B recipe's phase under 10 s with the benchmark's per-bucket overhead."""
import json

import pytest
import yaml

from megatron_rence.config import Config, ModelConfig, ParallelConfig
from megatron_rence.phases import engine_feed_ranks
from megatron_rence.plan import main as plan_main
from megatron_rence.planning.sync_cost import ALIGN, feed_ranks, rank_bytes, sync_cost, sync_tensors
from megatron_rence.planning.sync_phase import BUCKET_FIXED_S, PhaseRates
from megatron_rence.weights import sync
from megatron_rence.weights.routes import Grid, Routes

VOCAB = 90

def test_cost_model_bytes_by_hand():
    """TP2 x PP2 feeding every rank, one node each stage: hand-summed from the tiny Llama's shapes (fp32)."""
    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                    dtype="fp32")
    layout = ParallelConfig(tp=2, pp=2)
    tensors = sync_tensors(m, layout, VOCAB)
    # embedding (90 padded to a multiple of 128 * TP: 256 x 32) on stage 0, output layer on stage 1; per layer: qkv (32+2*16) x 32, proj 32x32,
    # fc1 96x32, fc2 32x48 split; two norms of 32 replicated; final norm on stage 1
    split_layer = (64 * 32 + 32 * 32 + 96 * 32 + 32 * 48) * 4
    assert sum(t.numel * 4 for t in tensors if t.tp_split) == 2 * 256 * 32 * 4 + 2 * split_layer

    def pack(numel_bytes: int) -> int:
        return -(-numel_bytes // ALIGN) * ALIGN

    counts = rank_bytes(tensors, Grid.megatron(2, 2, 1), [0, 1, 2, 3], 4, gpus_per_node=2)
    c0 = counts[0]  # stage 0, TP rank 0
    # relay: its pieces of stage 0's tensors to rank 2 (embedding half, layer 0 halves, two norm halves)
    stage0 = [256 * 32 * 4 // 2] + [n // 2 for n in (64 * 32 * 4, 32 * 32 * 4, 96 * 32 * 4, 32 * 48 * 4)] + [64, 64]
    assert c0.sent_inter == sum(pack(b) for b in stage0)
    # TP all-gather: half of every split tensor of both stages, plus half of stage 1's norms (3 of 32 floats)
    assert c0.sent_intra == (2 * 256 * 32 * 4 + 2 * split_layer) // 2 + 3 * 64
    assert c0.collectives == 1 + 4 + (4 + 2) + 2  # own split; stage 1's layer split + norms, output, final norm
    assert counts[0] == counts[1] and c0.recv_inter == counts[2].sent_inter


def test_cpu_engine_on_rank_0_gets_pieces_straight_from_their_holders():
    """TP2 x PP2 x DP2 feeding rank 0 only: every holder of a piece sends it to rank 0 once; DP replica 1 and the
    TP peer's all-gathers are not needed."""
    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2)
    grid = Grid.megatron(2, 2, 2)
    tensors = sync_tensors(m, ParallelConfig(tp=2, pp=2), VOCAB)
    counts = rank_bytes(tensors, grid, [0], 2, gpus_per_node=None)
    assert all(c.sent == c.received == 0 for c in counts[2:4] + counts[6:8])  # replica dp=1: ranks 2, 3, 6, 7
    assert all(c.collectives == 0 for c in counts)
    routes = Routes(grid, frozenset([0]))
    assert routes.strategy((0, 0), 0) == "some" and routes.strategy((0, 0), 1) == "none"
    senders = sorted(h.src for hops in routes.rounds(1) + routes.rounds(0) for h in hops)
    assert senders == [1, 4, 5] and all(h.dst == 0 for hops in routes.rounds(1) for h in hops)
    total = sum(t.numel * 2 for t in tensors)
    own_replicated = sum(t.numel * 2 for t in tensors if t.stage == 0 and not t.tp_split)
    # rank 0 receives everything but its own pieces (and its own stage's norms, which it holds), within padding
    assert 0 <= counts[0].received - (total - own_replicated - sum(
        t.numel for t in tensors if t.stage == 0 and t.tp_split)) < 64 * len(tensors)


def test_feed_ranks_equal_phases():
    for engine, tp, world in (("hf", 1, 4), ("sglang", 2, 4), ("sglang", 8, 64)):
        cfg = Config()
        cfg.rollout.engine = engine
        cfg.rollout.sglang.tp = tp
        assert feed_ranks(cfg, world) == engine_feed_ranks(cfg, world)


def test_transport_and_cost_model_share_the_pack_alignment():
    assert sync._ALIGN == ALIGN


def test_70b_recipe_syncs_in_under_10_s_and_no_rank_sends_more_than_the_model(capsys):
    code = plan_main(["recipes/rence_70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    s = out["sync"]
    assert code == 0 and 0 < s["estimate_s"] < 10
    assert s["max_rank_send_gb"] < s["model_gb"]
    # TP8 x PP2 on 8-GPU nodes: a rank's inter-node traffic is its stage / TP (about 141 / 2 / 8 GB)
    assert abs(s["busiest_sent_inter_gb"] - s["model_gb"] / 16) < 0.05 * s["model_gb"] / 16
    plan_main(["recipes/rence_70b.yaml", "--nodes", "8", "--gpus-per-node", "8"])
    assert "sync      weights: est." in capsys.readouterr().out


def _tiny_phase_cfg(*overrides: str) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                            num_query_groups=2, dtype="bf16", vocab_size=VOCAB)
    cfg.parallel = ParallelConfig(tp=2)
    cfg.rollout.engine = "sglang"
    cfg.rollout.sglang.tp = 2
    cfg.weights.bucket_bytes = 10**9
    for item in overrides:
        key, value = item.split("=")
        section, name = key.split(".", 1)
        owner = getattr(cfg, section)
        if "." in name:
            sub, name = name.split(".")
            owner = getattr(owner, sub)
        setattr(owner, name, yaml.safe_load(value))
    return cfg


SLOW = PhaseRates(host_pinned_d2h_gbps=2e-3, host_pinned_h2d_gbps=1e-3, host_pageable_gbps=1e-4, hbm_copy_gbps=1e-3, bucket_fixed_s=0.01, engine_resume_s=0.1,
                  engine_release_s=0.2, fp8_copies=6.0)  # 1 MB/s: every term in readable seconds


def test_phase_terms_by_hand():
    """TP2 x DP1, SGLang TP2, one bucket. Per GPU: embedding 256 x 32 / 2 = 4096, layers 2 x ((64*32 + 32*32 +
    96*32 + 32*48) / 2 + 64) = 7808, final norm 32, output 4096 -> 16,032 params; full model 31,904 params."""
    cost = sync_cost(_tiny_phase_cfg(), VOCAB, 2, 2, rates=SLOW)
    t = cost.phase.terms
    assert cost.phase.buckets == 1 and cost.phase.engine_calls == 1
    assert t["trainer_offload"] == pytest.approx(16032 * 12 / 2e6)  # Adam state to pinned buffers at 2 MB/s
    assert t["engine_resume"] == 0.1 and t["engine_release"] == 0.2
    assert t["transfers"] == cost.transfer_s + cost.latency_s
    assert t["bucket_overhead"] == pytest.approx(0.01)
    # merged layer weights (2 x 7680 params) + the flattened bucket (31,904), bf16, at 1 MB/s
    assert t["trainer_copies"] == pytest.approx((2 * 7680 + 31904) * 2 / 1e6)
    assert t["engine_load"] == pytest.approx(31904 * 2 / 2 / 1e6)  # each engine GPU copies its half
    assert t["fp8_quantise"] == 0 and t["overlap_saved"] == 0  # one bucket: nothing to overlap
    assert t["trainer_restore"] == pytest.approx(16032 * 12 / 1e6 + 16032 * 4 / 2e6)  # 1 MB/s + zeroing fp32 grads
    assert cost.phase.phase_estimate_s == pytest.approx(sum(t.values()))
    kept = sync_cost(_tiny_phase_cfg("train.offload_optimizer=false"), VOCAB, 2, 2, rates=SLOW).phase.terms
    assert kept["trainer_offload"] == 0 and kept["trainer_restore"] == pytest.approx(16032 * 4 / 2e6)
    params = sync_cost(_tiny_phase_cfg("train.offload_params=true"), VOCAB, 2, 2, rates=SLOW).phase.terms
    assert params["trainer_offload"] == pytest.approx(16032 * 12 / 2e6 + 16032 * 2 / 1e5)  # bf16 params, pageable


def test_phase_fp8_calls_and_overlap():
    fp8 = sync_cost(_tiny_phase_cfg("rollout.sglang.fp8_weights=true"), VOCAB, 2, 2, rates=SLOW).phase
    assert fp8.engine_calls == 3  # bf16 (embedding, norms, output), float8 weights, float32 scales
    assert fp8.terms["fp8_quantise"] == pytest.approx(6 * 2 * 7680 * 2 / 1e6)
    assert fp8.terms["engine_load"] == pytest.approx((31904 * 2 - 2 * 7680) / 2 / 1e6)  # linear weights at 1 byte
    small = ["weights.bucket_bytes=4000"]
    serial = sync_cost(_tiny_phase_cfg(*small, "weights.overlap_gather=false"), VOCAB, 2, 2, rates=SLOW).phase
    piped = sync_cost(_tiny_phase_cfg(*small), VOCAB, 2, 2, rates=SLOW).phase
    assert serial.buckets == piped.buckets > 2 and serial.terms["overlap_saved"] == 0
    # every gather but the first hides under the previous bucket's consumption (here always the longer one)
    transfers = piped.terms["transfers"]
    assert 0 < -piped.terms["overlap_saved"] < transfers


def test_70b_phase_under_10_s_with_every_term_justified(capsys):
    plan_main(["recipes/rence_70b.yaml", "--nodes", "8", "--gpus-per-node", "8", "--json"])
    s = json.loads(capsys.readouterr().out)["sync"]
    terms = s["phase_terms_s"]
    assert set(terms) == {"trainer_offload", "engine_resume", "transfers", "bucket_overhead", "trainer_copies",
                          "fp8_quantise", "engine_load", "overlap_saved", "engine_release", "trainer_restore"}
    assert set(s["phase_basis"]) == set(terms) and all(s["phase_basis"].values())
    assert s["phase_estimate_s"] == pytest.approx(sum(terms.values())) and 0 < s["phase_estimate_s"] < 10
    # the per-bucket overhead is the benchmark's figure (bench_sglang_update.py, docs/performance.md)
    assert terms["bucket_overhead"] == pytest.approx(s["engine_calls"] * BUCKET_FIXED_S)
    assert f"{BUCKET_FIXED_S * 1e3:.1f} ms" in s["phase_basis"]["bucket_overhead"]
