"""rence-plan: parameter counts against the published models, the activation formula against the paper, memory
on a tiny config by hand, the layout rules, every shipped recipe on the cluster it documents, and the CLI."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.plan import plan
from megatron_rence.planning.activations import chunks_in_flight, layer_activation, stage_activation_bytes
from megatron_rence.planning.memory import LOGPROB_CHUNK_BYTES, Hardware, memory_plan
from megatron_rence.planning.params import model_params, padded_vocab_size, stage_params
from megatron_rence.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


def llama3(layers, hidden, ffn, heads):
    return ModelConfig(arch="llama", num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, num_query_groups=8, vocab_size=128256)


# Llama-3-8B: embedding 128256*4096 = 525,336,576 (x2, untied); per layer q 4096^2 + k,v 2*4096*1024 + o 4096^2
# = 41,943,040, mlp 3*4096*14336 = 176,160,768, norms 2*4096 -> 218,112,000; x32 = 6,979,584,000; final norm 4096.
# 2*525,336,576 + 6,979,584,000 + 4096 = 8,030,261,248.
# Llama-3-70B: embedding 128256*8192 = 1,050,673,152 (x2); per layer q,o 2*8192^2 + k,v 2*8192*1024 = 150,994,944,
# mlp 3*8192*28672 = 704,643,072, norms 16,384 -> 855,654,400; x80 = 68,452,352,000; + 8192 -> 70,553,706,496.
# Qwen2.5-1.5B (tied, QKV bias): embedding 151936*1536 = 233,373,696; per layer q,o 2*1536^2 + k,v 2*1536*256
# + biases 1536+512 + mlp 3*1536*8960 + norms 3072 = 46,797,824; x28 = 1,310,339,072; + 1536 -> 1,543,714,304.
# Qwen3-4B (tied, QK-norm, head dim 128): embedding 151936*2560 = 388,956,160; per layer q,o 2*2560*4096
# + k,v 2*2560*1024 + qk-norm 256 + mlp 3*2560*9728 + norms 5120 = 100,930,816; x36 + 2560 -> 4,022,468,096.
@pytest.mark.parametrize("model, expected", [
    (llama3(32, 4096, 14336, 32), 8_030_261_248),
    (llama3(80, 8192, 28672, 64), 70_553_706_496),
    (ModelConfig(arch="qwen2", num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                 num_query_groups=2, vocab_size=151936, add_qkv_bias=True, tie_word_embeddings=True), 1_543_714_304),
    (ModelConfig(arch="qwen3", num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                 num_query_groups=8, kv_channels=128, vocab_size=151936, qk_layernorm=True,
                 tie_word_embeddings=True), 4_022_468_096),
])
def test_parameter_counts_match_published_models(model, expected):
    assert model_params(model, model.vocab_size).total == expected


def test_stage_params_split_layers_vocab_and_tied_output():
    m = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                    make_vocab_size_divisible_by=8, tie_word_embeddings=True)
    # vocab 100 -> padded to 112 (multiple of 8*2), 56 rows per TP rank; layer: 12288 attention + 49152 mlp
    # split over 2, 128 norm weights whole -> 30848 per rank; 2 layers per stage.
    first, last = stage_params(m, ParallelConfig(tp=2, pp=2), 100)
    assert padded_vocab_size(100, 8, 2) == 112
    assert first.params == 2 * 30848 + 56 * 64
    assert last.params == 2 * 30848 + 64 + 56 * 64  # tied + pp>1: the last stage keeps its own output copy
    (single,) = stage_params(m, ParallelConfig(tp=2, pp=1), 100)
    assert single.params == 4 * 30848 + 56 * 64 + 64  # tied, one stage: embedding counted once


def test_activation_formula_reduces_to_the_paper():
    """Korthikanti et al. 2022, per token per layer: 34h + 5as; TP: 10h + 24h/t + 5as/t; TP+SP: (34h + 5as)/t;
    selective+SP: 34h/t; full+SP: 2h/t, for a GPT layer (MHA, 4h GeLU MLP, dropout, unfused attention)."""
    h, a, s, t = 1024, 16, 2048, 4
    gpt = ModelConfig(hidden_size=h, num_attention_heads=a, num_query_groups=a, ffn_hidden_size=4 * h)
    paper = dict(gated=False, dropout=True, flash=False, act_bytes=2)
    assert layer_activation(gpt, 1, False, s, **paper).total == 34 * h + 5 * a * s
    assert layer_activation(gpt, t, False, s, **paper).total == pytest.approx(10 * h + 24 * h / t + 5 * a * s / t)
    sp = layer_activation(gpt, t, True, s, **paper)
    assert sp.total == pytest.approx((34 * h + 5 * a * s) / t)
    assert sp.rest == pytest.approx(34 * h / t) and sp.layer_input == pytest.approx(2 * h / t)


def test_pipeline_in_flight_matches_the_paper():
    # 1F1B: the first stage holds pp microbatches of L/pp layers (= L layers' worth); the last holds one.
    p = ParallelConfig(pp=4)
    assert [chunks_in_flight(p, s, 16) for s in range(4)] == [4, 3, 2, 1]
    assert chunks_in_flight(p, 0, 2) == 2  # capped by the microbatches in the step
    # interleaved with m = vpp = 2: L * (1 + (p - 1) / (p * m)) layers' worth on the first stage
    pv = ParallelConfig(pp=4, vpp=2)
    layers = 32
    assert chunks_in_flight(pv, 0, 16) * layers // 8 == layers * (1 + 3 / 8)


def test_recompute_choices():
    m = ModelConfig(num_layers=8, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2)
    layer = layer_activation(m, 1, False, 32)
    p = ParallelConfig(pp=2)
    none = stage_activation_bytes(m, p, 0, 8, 10, layer)
    assert none == 2 * 4 * layer.total * 10  # 2 microbatches in flight x 4 layers x 10 tokens
    p = ParallelConfig(pp=2, recompute="selective")
    assert stage_activation_bytes(m, p, 0, 8, 10, layer) == 2 * 4 * layer.rest * 10
    p = ParallelConfig(pp=2, recompute="full", recompute_num_layers=2)
    # 2 microbatches x 2 groups of 2 layers keep their input, plus one group's full activations in backward
    assert stage_activation_bytes(m, p, 0, 8, 10, layer) == (2 * 2 * layer.layer_input + 2 * layer.total) * 10


TINY = {
    "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 256, "num_attention_heads": 4,
              "num_query_groups": 2, "vocab_size": 100, "make_vocab_size_divisible_by": 8, "dtype": "bf16"},
    "rollout": {"engine": "sglang", "prompts_per_step": 2, "num_samples": 2, "max_new_tokens": 16,
                "sglang": {"tp": 1, "mem_fraction_static": 0.5}},
    "train": {"global_batch_size": 4, "micro_batch_size": 2, "max_seq_len": 32, "device": "cuda"},
}


def test_memory_on_a_tiny_config_by_hand(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_recipe(tmp_path / "tiny.yaml")
    gib = 1024 ** 3
    hw = Hardware(nodes=1, gpus_per_node=1, gpu_mem_gb=1.0, context_gb=0.0, reserve_gb=0.0, engine_residue_gb=0.0)
    mem = memory_plan(cfg, hw, vocab_size=100, dp=1, num_microbatches=2)
    (stage,) = mem.stages
    items = {i.name: i.bytes for i in stage.items}
    # params: embedding 100*64 = 6400, layer 12288 + 49152 + 128 = 61568 (x2), final norm 64, output 6400
    assert mem.params.total == 6400 + 2 * 61568 + 64 + 6400 == 136000
    rank = 2 * 104 * 64 + 2 * 61568 + 64  # padded vocab 104 on this rank
    assert items["weights"] == rank * 2 and items["gradients"] == rank * 4 and items["optimizer"] == rank * 12
    # per token per layer: norms/linear inputs 4*64*2 = 512; Q,K,V (64+32+32)*2 + attn out 64*2 + SwiGLU 3*256*2
    # = 1920; flash log-sum-exp 4*4 = 16 -> 2448; 2 layers x 64 tokens (2 x 32), one microbatch in flight
    assert items["activations"] == 2 * 2448 * 64
    # logits 64 x 104 x 2 bytes, twice (logits + grad), fp32 chunk 64*104*4, final-norm/output inputs 2*64*64*2
    assert items["log-probs (logits)"] == 2 * 13312 + 26624 + 16384
    assert items["engine weights"] == 136000 * 2
    assert items["engine KV cache"] == 0.5 * gib - 272000
    assert mem.engine.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 and mem.engine.kv_tokens == int((0.5 * gib - 272000) // 256)
    assert items["weight-sync buckets"] == 2 * 272000  # a bucket never exceeds the whole model
    # SGLang's request table: int32 [min(max(2,096,089 tokens / 2048 * 512, 2048), 4096), 2048 + 4]
    assert items["engine request table"] == 4096 * 2052 * 4
    # rollout and sync: gradients and optimizer state are off the GPU (megatron/offload.py), weights stay
    assert stage.totals == {"rollout": rank * 2 + 0.5 * gib + 4096 * 2052 * 4, "train": rank * (2 + 4 + 12) + 2 * 2448 * 64 + 69632,
                            "sync": rank * 2 + 272000 + 544000}
    assert mem.fits and stage.peak_phase == "rollout" and mem.rollout_trainer_resident == rank * 2
    # every sequence of a step at full length: 2 prompts x 2 samples x (512 prompt + 16 new tokens), one engine
    assert mem.engine.kv_tokens_needed == 4 * (512 + 16)
    # an engine restarted during rollout starts next to the trainer's weights: 0.5 x (1 GiB - weights) - its weights
    assert mem.kv_tokens_after_restart == int((0.5 * (gib - rank * 2) - 272000) // 256)


def test_offload_params_and_engine_residue_by_hand(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_recipe(tmp_path / "tiny.yaml", ["train.offload_params=true"])
    gib = 1024 ** 3
    hw = Hardware(gpus_per_node=1, gpu_mem_gb=1.0, context_gb=0.0, reserve_gb=0.0, engine_residue_gb=0.25)
    (stage,) = memory_plan(cfg, hw, 100, 1, 2).stages
    rank = 2 * 104 * 64 + 2 * 61568 + 64
    # nothing of the trainer's: its weights are on CPU (+ the engine's request table)
    assert stage.totals["rollout"] == 0.5 * gib + 0.25 * gib + 4096 * 2052 * 4
    assert stage.totals["sync"] == rank * 2 + 272000 + 544000 + 0.25 * gib  # the sync reads the weights
    assert stage.totals["train"] == rank * (2 + 4 + 12) + 2 * 2448 * 64 + 69632 + 0.25 * gib


def test_kv_pool_is_sized_from_free_memory_after_contexts(tmp_path):
    """SGLang's rule: KV = fraction x F - weights, F = GPU - contexts (min over the group); a restarted engine's
    F also loses the trainer's rollout residue; the request table is outside the pool and sized from it."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_recipe(tmp_path / "tiny.yaml", ["model.max_position_embeddings=8192"])
    gib = 1024 ** 3
    hw = Hardware(gpus_per_node=1, gpu_mem_gb=2.0, context_gb=0.5, reserve_gb=0.0, engine_residue_gb=0.0)
    mem = memory_plan(cfg, hw, 100, 1, 2)
    kv = 0.5 * 1.5 * gib - 272000
    assert mem.engine.kv_bytes == kv and mem.engine.kv_tokens == int(kv // 256)
    rank = 2 * 104 * 64 + 2 * 61568 + 64
    assert mem.kv_tokens_after_restart == int((0.5 * (1.5 * gib - rank * 2) - 272000) // 256)
    # 3,144,670 tokens / 8192 * 512 = 196,541 requests -> capped at 4096; rows of 8192 + 4 int32
    items = {i.name: i.bytes for i in mem.stages[0].items}
    assert items["engine request table"] == 4096 * 8196 * 4
    # a small pool: the floor of 2048 requests
    small = memory_plan(load_recipe(tmp_path / "tiny.yaml", ["model.max_position_embeddings=131072",
                                                              "rollout.sglang.mem_fraction_static=0.01"]), hw, 100, 1, 2)
    assert {i.name: i.bytes for i in small.stages[0].items}["engine request table"] == 2048 * 131076 * 4


def test_engine_without_memory_saver_keeps_its_pool_in_training(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_recipe(tmp_path / "tiny.yaml", ["rollout.sglang.enable_memory_saver=false"])
    mem = memory_plan(cfg, Hardware(gpus_per_node=1, gpu_mem_gb=1.0, reserve_gb=0.0), 100, 1, 2)
    (stage,) = mem.stages
    assert stage.totals["train"] > 0.5 * 1024 ** 3  # weights + KV stay while the trainer runs


def test_constants_mirror_the_trainer():
    from megatron_rence.megatron import logprobs, model

    assert LOGPROB_CHUNK_BYTES == logprobs.DEFAULT_CHUNK_BYTES
    for vocab, div, tp in [(128256, 128, 8), (151936, 128, 2), (31, 8, 1), (100, 8, 3)]:
        assert padded_vocab_size(vocab, div, tp) == model.padded_vocab_size(vocab, div, tp)


def _documented_cluster(path: Path) -> tuple[int, int]:
    match = re.search(r"^# plan: --nodes (\d+) --gpus-per-node (\d+)", path.read_text(), re.M)
    return (int(match.group(1)), int(match.group(2))) if match else (1, 1)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_passes_the_planner(path):
    nodes, gpus = _documented_cluster(path)
    report = plan(load_recipe(path), Hardware(nodes=nodes, gpus_per_node=gpus))
    assert report.exit_code == 0, report.problems


def test_70b_recipe_layout_and_kv_cache():
    report = plan(load_recipe(REPO / "recipes" / "rence_70b.yaml"), Hardware(nodes=8, gpus_per_node=8))
    assert report.layout.dp == 4 and report.memory.params.total == 70_553_706_496
    assert report.memory.engine.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 / 8  # K and V, 8 KV heads over tp=8
    assert report.memory.engine.num_engines == 8
    # the lifecycle requirements: during rollout the trainer holds at most its bf16 weights, and each
    # engine's KV cache holds every sequence of a step at full length at once
    cfg, mem = report.cfg, report.memory
    bf16_weights = 2 * max(s.params for s in stage_params(cfg.model, cfg.parallel, cfg.model.vocab_size))
    assert 0 < mem.rollout_trainer_resident <= bf16_weights
    need = 64 * 8 * (512 + 7680) // 8
    assert mem.engine.kv_tokens_needed == need and mem.engine.kv_tokens >= need
    assert mem.kv_tokens_after_restart >= need and report.exit_code == 0


@pytest.mark.parametrize("overrides, key", [
    (["parallel.tp=3"], "parallel.tp"),  # 64 heads, 8 KV groups, 28672 ffn: none divisible by 3
    (["parallel.pp=3"], "parallel.pp"),  # 80 layers
    # interleaved: pp=4 x vpp=2, dp=2, 32 / (8 * 2) = 2 microbatches per step: not a multiple of pp=4
    (["parallel.pp=4", "parallel.vpp=2", "train.global_batch_size=32"], "parallel.vpp"),
    (["rollout.sglang.tp=3"], "rollout.sglang.tp"),  # not a divisor of 8 GPUs per node nor of 64 heads
    (["model.fp8=delayed", "model.ffn_hidden_size=28680"], "model.ffn_hidden_size"),  # 28680/8 = 3585, not /16
    # 28160 / 8 = 3520 rows of gate/up per engine rank: not whole 128-row FP8 blocks
    (["rollout.sglang.fp8_weights=true", "model.ffn_hidden_size=28160"], "rollout.sglang.fp8_weights"),
])
def test_invalid_layouts_name_the_key(overrides, key):
    report = plan(load_recipe(REPO / "recipes" / "rence_70b.yaml", overrides), Hardware(nodes=8, gpus_per_node=8))
    assert report.exit_code == 2
    assert any(key in e for e in report.layout.errors), report.layout.errors


def test_sglang_block_fp8_shape_rules_by_hand():
    from megatron_rence.planning.layout import sglang_block_shape_problems

    assert sglang_block_shape_problems(8192, 64, 8, 128, 28672, engine_tp=8) == []  # Llama-3-70B
    assert sglang_block_shape_problems(8192, 64, 8, 128, 28672, engine_tp=1) == []
    assert sglang_block_shape_problems(1536, 12, 2, 128, 8960, engine_tp=2) == []  # Qwen2.5-1.5B: kv 1 head per rank
    # tp=4: q 384 (3 blocks), kv 2 heads < 4 ranks -> 1 replicated head = 128; ffn 8960 / 4 = 2240 = 17.5 blocks
    problems = sglang_block_shape_problems(1536, 12, 2, 128, 8960, engine_tp=4)
    assert problems == ["gate_proj / up_proj rows per engine rank = 2240 is not a multiple of the 128-wide FP8 block",
                        "down_proj columns per engine rank = 2240 is not a multiple of the 128-wide FP8 block"]
    # a demo-sized model: hidden 64 = 4 heads x 16, 2 KV heads, ffn 128 at tp=1 (row-parallel inputs unsplit)
    assert [p.split(" = ")[0] for p in sglang_block_shape_problems(64, 4, 2, 16, 128, engine_tp=1)] == [
        "hidden_size (q/k/v, gate/up input columns)", "q_proj rows per engine rank",
        "k_proj / v_proj rows per engine rank"]


def test_recipes_serve_fp8_weights_at_their_engine_tp():
    for name in ("rence_70b.yaml", "rence_8b.yaml", "rence_1p5b.yaml", "qwen3_4b_paper.yaml"):
        path = REPO / "recipes" / name
        nodes, gpus = _documented_cluster(path)
        report = plan(load_recipe(path, ["rollout.sglang.fp8_weights=true"]), Hardware(nodes=nodes, gpus_per_node=gpus))
        assert not report.layout.errors, (name, report.layout.errors)


def test_valid_interleaved_layout():
    cfg = load_recipe(REPO / "recipes" / "rence_70b.yaml", ["parallel.pp=4", "parallel.vpp=2"])
    report = plan(cfg, Hardware(nodes=8, gpus_per_node=8))  # 512 / (8 * 2) = 32 microbatches
    assert not report.layout.errors and report.layout.num_microbatches == 32


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_rence.plan", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_70b_at_tp1_on_one_node_does_not_fit():
    proc = run_cli("recipes/rence_70b.yaml", "parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false",
                   "--nodes", "1", "--gpus-per-node", "8")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "does not fit" in proc.stderr and "GiB" in proc.stderr and "weights" in proc.stderr


def test_cli_engine_weights_without_room_for_kv_and_invalid_layout():
    proc = run_cli("recipes/rence_70b.yaml", "rollout.sglang.tp=1", "--nodes", "8", "--gpus-per-node", "8")
    assert proc.returncode == 1  # 131 GiB of engine weights per GPU: no KV cache fits the static pool
    assert "rollout.sglang.mem_fraction_static" in proc.stderr and "131.4 GiB" in proc.stderr
    proc = run_cli("recipes/rence_70b.yaml", "parallel.tp=3", "--nodes", "8", "--gpus-per-node", "8")
    assert proc.returncode == 2 and "parallel.tp" in proc.stderr


def test_cli_json_and_fit():
    proc = run_cli("recipes/rence_8b.yaml", "--nodes", "1", "--gpus-per-node", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    data = json.loads(proc.stdout)
    assert data["fits"] and data["num_params"] == 8_030_261_248 and data["dp"] == 2
    assert data["peak_gib"] == pytest.approx(max(data["totals_gib"].values()))
    assert data["rollout_trainer_resident_gib"] == pytest.approx(data["items"]["weights"])  # grads, optimizer off
    assert data["kv_tokens"] > 0 and data["kv_tokens_needed"] > 0 and set(data["totals_gib"]) == {"rollout", "train",
                                                                                                 "sync"}


def test_hints_never_suggest_offload_params_with_the_distributed_optimizer(tmp_path):
    """train.offload_params and parallel.distributed_optimizer exclude each other (config.py): a plan that does
    not fit suggests at most the one the recipe can still take."""
    from megatron_rence.plan import _hints

    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    neither = _hints(load_recipe(tmp_path / "tiny.yaml"), "rollout")
    assert "train.offload_params=true (not with parallel.distributed_optimizer)" in neither
    assert "parallel.distributed_optimizer=true" in neither
    dist_opt = _hints(load_recipe(tmp_path / "tiny.yaml", ["parallel.distributed_optimizer=true"]), "rollout")
    assert not any("offload_params" in hint for hint in dist_opt)
    offload = _hints(load_recipe(tmp_path / "tiny.yaml", ["train.offload_params=true"]), "train")
    assert "parallel.distributed_optimizer=true" not in offload


def test_optimizer_kept_on_the_gpu_counts_in_every_phase(tmp_path):
    """train.offload_optimizer=false: the Adam state (12 B/param here) stays through rollout and sync."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    hw = Hardware(gpus_per_node=1, gpu_mem_gb=1.0, context_gb=0.0, reserve_gb=0.0, engine_residue_gb=0.0)
    moved = memory_plan(load_recipe(tmp_path / "tiny.yaml"), hw, 100, 1, 2)
    kept = memory_plan(load_recipe(tmp_path / "tiny.yaml", ["train.offload_optimizer=false"]), hw, 100, 1, 2)
    rank = 2 * 104 * 64 + 2 * 61568 + 64
    for phase in ("rollout", "sync"):
        assert kept.stages[0].totals[phase] - moved.stages[0].totals[phase] == rank * 12
    assert kept.stages[0].totals["train"] == moved.stages[0].totals["train"]
    assert kept.rollout_trainer_resident == moved.rollout_trainer_resident + rank * 12
