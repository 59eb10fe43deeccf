"""MetricsLogger on resume: a torn last line of metrics.jsonl is dropped with a warning (a bad line elsewhere
names file:line); TensorBoard does not hold the re-run steps twice."""
import json

import pytest

from megatron_rence.config import LoggingConfig
from megatron_rence.metrics import MetricsLogger, read_metrics


def _cfg(tensorboard: bool = False) -> LoggingConfig:
    return LoggingConfig(jsonl=True, tensorboard=tensorboard, progress_bar=False)


def _write(path, steps, torn: str = ""):
    path.write_text("".join(json.dumps({"step": s, "loss/total": 0.5}) + "\n" for s in steps) + torn)


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3], torn='{"step": 4, "loss/to')
    logger = MetricsLogger(_cfg(), tmp_path, num_steps=5, start_step=3, resume_step=3)
    logger.log(4, {"loss/total": 0.25})
    logger.close()
    out = capsys.readouterr().out
    assert f"{tmp_path / 'metrics.jsonl'}:4: dropping a torn last line" in out
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_resume_drops_steps_after_the_checkpoint_and_names_a_bad_middle_line(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3, 4])
    MetricsLogger(_cfg(), tmp_path, num_steps=5, start_step=2, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not JSON"):
        MetricsLogger(_cfg(), tmp_path, num_steps=5, start_step=2, resume_step=2)


def test_tensorboard_does_not_replay_steps_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = MetricsLogger(_cfg(tensorboard=True), tmp_path, num_steps=5)
    for step in range(1, 6):  # killed after step 5; the checkpoint is at step 3
        first.log(step, {"loss/total": float(step)})
    first.close()
    second = MetricsLogger(_cfg(tensorboard=True), tmp_path, num_steps=5, start_step=3, resume_step=3)
    for step in (4, 5):
        second.log(step, {"loss/total": 10.0 * step})
    second.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("loss/total")]
    assert events == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]


def test_a_full_disk_while_logging_names_the_file(tmp_path):
    import errno

    logger = MetricsLogger(_cfg(), tmp_path, num_steps=2)

    class FullDisk:  # a fake file: a real full disk needs a tiny file system mounted for the test
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    logger._jsonl = FullDisk()
    with pytest.raises(OSError, match=rf"{tmp_path / 'metrics.jsonl'}: writing the metrics of step 1 failed: "
                                      "no space left on device"):
        logger.log(1, {"loss/total": 1.0})
    logger.close()


def test_a_fresh_run_keeps_an_earlier_log_aside(tmp_path, capsys):
    """A run that stopped before its first checkpoint leaves only metrics.jsonl; launching afresh in the same
    run dir must not delete it (nothing lost): it becomes metrics.jsonl.1, then .2 for the next one."""
    _write(tmp_path / "metrics.jsonl", [1, 2])
    logger = MetricsLogger(_cfg(), tmp_path, num_steps=1)
    logger.log(1, {"loss/total": 9.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    kept = (tmp_path / "metrics.jsonl.1").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2]
    assert "kept as" in capsys.readouterr().out
    MetricsLogger(_cfg(), tmp_path, num_steps=1).close()
    assert json.loads((tmp_path / "metrics.jsonl.2").read_text())["loss/total"] == 9.0
    assert (tmp_path / "metrics.jsonl.1").read_text().count("\n") == 2
