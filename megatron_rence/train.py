"""Training entry point: `python -m megatron_rence.train RECIPE [overrides] [--print-config|--dry-run|--resume]`."""
from __future__ import annotations

import sys

from megatron_rence.cli import handle_info_flags, load_or_exit, recipe_parser
from megatron_rence.recipe import save_resolved


def main(argv: list[str] | None = None) -> int:
    parser = recipe_parser("rence-train", "Train with ReNCE / GRPO / DAPO / online DPO.")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run dir")
    args = parser.parse_intermixed_args(argv)
    cfg = load_or_exit(args)
    if handle_info_flags(args, cfg):
        return 0
    save_resolved(cfg, cfg.train.run_dir)
    print("training loop not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
