"""A fake `srun` for the tests that cannot run real Slurm (tests/unit/test_slurm.py,
tests/e2e/test_slurm_preemption.py); the real one is exercised by tests/slurm/. It behaves as real srun does
towards its tasks (src/srun/signals.c, the same from Slurm 22.05 to 25.05):

- SIGTERM, SIGHUP, SIGQUIT: "forcing job termination", SIGKILL to every task;
- SIGUSR1, SIGUSR2: forwarded unchanged to every task;
- SIGINT: the first only prints; a second within a second sends SIGINT, then SIGKILL, to every task.

It starts `--ntasks-per-node` x `--nodes` tasks (default 1; $FAKE_SRUN_NTASKS if set) with SLURM_PROCID /
SLURM_NTASKS / SLURM_LOCALID set, their output appended to `--output`, and exits with the first non-zero task status (128 + N for a task killed
by signal N). It records its arguments in $FAKE_LOG/srun.args and each signal it gets in $FAKE_LOG/srun.signals.
Python, not bash: a background job of a non-interactive shell starts with SIGINT ignored, and bash cannot
trap a signal ignored on entry (real srun, a C program, still receives it).
"""
import os
import signal
import subprocess
import sys
import time

LOG = os.environ["FAKE_LOG"]


def _record(name: str, line: str) -> None:
    with open(os.path.join(LOG, name), "a") as f:
        f.write(line + "\n")


def main(argv: list[str]) -> int:
    _record("srun.args", " ".join(argv))
    out, per_node, nodes = None, 1, 1
    while argv and argv[0].startswith("-"):
        opt = argv.pop(0)
        if opt.startswith("--output="):
            out = opt.split("=", 1)[1]
        elif opt.startswith("--ntasks-per-node="):
            per_node = int(opt.split("=", 1)[1])
        elif opt.startswith("--nodes="):
            nodes = int(opt.split("=", 1)[1])
    n = int(os.environ.get("FAKE_SRUN_NTASKS", per_node * nodes))  # the unit tests run one task of a 64-task step
    stdout = open(out, "a") if out else None
    tasks: list[subprocess.Popen] = []
    last_int = [0.0]

    def signal_all(sig: int) -> None:
        for task in tasks:
            if task.poll() is None:
                task.send_signal(sig)

    def forcing(signum, frame):
        _record("srun.signals", signal.Signals(signum).name[3:])
        print("srun: forcing job termination", file=sys.stderr, flush=True)
        signal_all(signal.SIGKILL)

    def forward(signum, frame):
        _record("srun.signals", signal.Signals(signum).name[3:])
        signal_all(signum)

    def interrupt(signum, frame):
        _record("srun.signals", "INT")
        now = time.monotonic()
        if now - last_int[0] < 1.0:
            signal_all(signal.SIGINT)
            signal_all(signal.SIGKILL)
        else:
            print("srun: interrupt (one more within 1 sec to abort)", file=sys.stderr, flush=True)
        last_int[0] = now

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, forcing)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, interrupt)
    for i in range(n):
        tasks.append(subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT if out else None, env=dict(
            os.environ, SLURM_PROCID=str(i), SLURM_NTASKS=str(n), SLURM_LOCALID=str(i))))
    statuses = [task.wait() for task in tasks]
    bad = [s for s in statuses if s != 0]
    if not bad:
        return 0
    return 128 - bad[0] if bad[0] < 0 else bad[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
