"""rence-plan's cluster checks (planning/cluster.py): checkpoint size and write time by hand, CPUs per task."""
from megatron_rence.config import Config
from megatron_rence.planning.cluster import check_cluster, checkpoint_bytes, cpus_needed


def test_checkpoint_bytes_by_hand():
    cfg = Config()
    cfg.model.dtype = "bf16"
    assert checkpoint_bytes(cfg, 10) == 10 * (2 + 12)  # bf16 weights + fp32 master, exp_avg, exp_avg_sq
    cfg.model.dtype = "fp32"
    assert checkpoint_bytes(cfg, 10) == 10 * (4 + 8)  # the weights are the master copy


def test_cpus_needed():
    cfg = Config()
    cfg.rollout.engine, cfg.rollout.sglang.tp, cfg.reward.num_workers = "sglang", 8, 4
    assert cpus_needed(cfg) == 1 + 9  # generation: 8 schedulers + detokenizer; grading comes after it
    cfg.reward.num_workers = 15
    assert cpus_needed(cfg) == 16
    cfg.rollout.engine = "hf"
    assert cpus_needed(cfg) == 16


def test_check_cluster_estimate_warning_and_error():
    cfg = Config()
    cfg.model.dtype, cfg.rollout.engine, cfg.rollout.sglang.tp, cfg.reward.num_workers = "bf16", "sglang", 2, 2
    ok = check_cluster(cfg, 5 * 10**9, cpus_per_task=4, grace_s=20.0, fs_gbps=5.0)
    assert ok.errors == [] and ok.warnings == []
    assert ok.lines == ["checkpoint 70.0 GB: ~14 s to write at 5 GB/s "
                        "(--fs-gbps; an assumption unless you measured it)"]
    slow = check_cluster(cfg, 5 * 10**9, cpus_per_task=3, grace_s=10.0, fs_gbps=5.0)
    assert len(slow.warnings) == 1 and "needs ~14 s at 5 GB/s but the trainer gets 10 s" in slow.warnings[0]
    assert len(slow.errors) == 1 and slow.errors[0].startswith("--cpus-per-task 3 < 4 CPUs")
    assert check_cluster(cfg, 1, None, None, fs_gbps=0).errors == ["--fs-gbps must be > 0, got 0"]
