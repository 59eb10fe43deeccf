"""rence-plan's cluster checks (planning/cluster.py): checkpoint size and write time by hand, CPUs per task."""
from megatron_rence.config import Config
from megatron_rence.planning.cluster import StopTimes, check_cluster, checkpoint_bytes, cpus_needed, stop_worst_cases


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
    assert ok.lines[0] == ("checkpoint 70.0 GB: ~14 s to write at 5 GB/s "
                           "(--fs-gbps; an assumption unless you measured it)")
    slow = check_cluster(cfg, 5 * 10**9, cpus_per_task=3, grace_s=10.0, fs_gbps=5.0)
    assert len(slow.warnings) == 1 and "train.on_stop=finish_step needs ~14 s from the signal to the checkpoint on " \
        "disk but gets 10 s" in slow.warnings[0]
    assert len(slow.errors) == 1 and slow.errors[0].startswith("--cpus-per-task 3 < 4 CPUs")
    assert check_cluster(cfg, 1, None, None, fs_gbps=0).errors == ["--fs-gbps must be > 0, got 0"]


def test_stop_worst_cases_by_hand():
    # finish_step: the whole step in flight (rollout 300 + rest 180) + checkpoint 200; abandon_step: max(300, 180) + 200
    assert stop_worst_cases(200.0, StopTimes(rollout_s=300.0, train_s=180.0)) == {"finish_step": 680.0,
                                                                                  "abandon_step": 500.0}
    assert stop_worst_cases(14.0, StopTimes()) == {"finish_step": 14.0, "abandon_step": 14.0}  # phases unknown


def test_stop_windows_name_the_path_that_loses_work():
    cfg = Config()
    cfg.model.dtype = "bf16"  # 14 bytes per parameter: 10**10 parameters = 140 GB = 28 s at 5 GB/s
    times = StopTimes(grace_s=100.0, kill_wait_s=30.0, rollout_s=60.0, train_s=20.0)
    report = check_cluster(cfg, 10**10, None, None, fs_gbps=5.0, times=times)
    # finish_step 60 + 20 + 28 = 108 s; abandon_step 60 + 28 = 88 s
    assert report.lines[1] == ("stop: rollout 60 s + rest of the step 20 s; worst case signal -> checkpoint on disk: "
                               "finish_step ~108 s, abandon_step ~88 s")
    assert "100 s: finish_step LOSES WORK (~108 s), abandon_step fits (~88 s)" in report.lines[2]
    assert "(KillWait): 30 s: finish_step LOSES WORK (~108 s), abandon_step LOSES WORK (~88 s)" in report.lines[3]
    assert len(report.warnings) == 2
    assert report.warnings[0].startswith("the time-limit warning (GRACE_S")
    assert "train.on_stop=abandon_step needs ~88 s" in report.warnings[0]
    assert "(KillWait) path would lose work" in report.warnings[1]
    cfg.train.on_stop = "abandon_step"
    report = check_cluster(cfg, 10**10, None, None, fs_gbps=5.0, times=times)
    assert len(report.warnings) == 1 and "(KillWait) path would lose work" in report.warnings[0]
    times.kill_wait_s = 120.0  # both fit
    assert check_cluster(cfg, 10**10, None, None, fs_gbps=5.0, times=times).warnings == []
