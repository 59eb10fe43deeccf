"""Weight-sync cost model (planning/sync_cost.py): hand-summed bytes per rank, the CPU engine's minimal traffic,
feed ranks equal to phases', and the 70B recipe's figures in rence-plan (goal: under 10 s, no rank sending more
than the model's bytes per sync)."""
import json

from megatron_rence.config import Config, ModelConfig, ParallelConfig
from megatron_rence.phases import engine_feed_ranks
from megatron_rence.plan import main as plan_main
from megatron_rence.planning.sync_cost import ALIGN, feed_ranks, rank_bytes, sync_tensors
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
