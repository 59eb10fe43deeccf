"""Plot a run's curves: `python tools/plot_metrics.py RUN_DIR [--out DIR]` writes PNGs (reward, loss, lengths, phase times)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_rence.plots import plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/plots")
    args = parser.parse_args(argv)
    try:
        written = plot(args.run_dir, args.out or args.run_dir / "plots")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
