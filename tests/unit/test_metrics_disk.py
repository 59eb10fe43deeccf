"""Issue 28 item 14: a write error in TensorBoard's event writer (a full disk) names the directory.

A real write error: the logging process runs with a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored), so the
event file's writes fail with EFBIG inside TensorBoard's writer thread, as ENOSPC would on a full disk."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from megatron_rence.config import LoggingConfig
    from megatron_rence.metrics import MetricsLogger

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logger = MetricsLogger(LoggingConfig(jsonl=False, tensorboard=True, progress_bar=False), sys.argv[1], 10)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    try:
        for step in range(1, 10):
            logger.log(step, {f"a/m{i}": float(i) for i in range(50)})
    except OSError as exc:
        print(f"OSError: {exc}")
        logger.close()  # does not raise the dead writer's error again
        print("closed")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_tensorboard_write_error_names_the_directory(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"OSError: [Errno 27] {tmp_path / 'run' / 'tensorboard'}: writing the TensorBoard "
                               "events of step 1 failed: file too large (logging.tensorboard=false turns them off)"), lines
    assert lines[1] == "closed"
