"""Shared command-line handling: a recipe path, dotted overrides, and the standard flags."""
from __future__ import annotations

import argparse
import sys

from megatron_rence.config import Config, ConfigError
from megatron_rence.recipe import dump_yaml, load_recipe


def recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.name=grpo rollout.num_samples=8")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML and exit")
    parser.add_argument("--dry-run", action="store_true", help="validate the recipe and exit")
    return parser


def load_or_exit(args: argparse.Namespace) -> Config:
    """Load the recipe; a user error prints one line naming the key and file, and exits 2."""
    try:
        return load_recipe(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def set_cpu_threads(num_threads: int) -> int:
    """Set torch's intra-op threads for this process to `train.num_threads` (0 leaves torch's setting: its
    default of all cores, or OMP_NUM_THREADS, which torchrun sets to 1 per process); returns the count in use."""
    import torch

    if num_threads > 0:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def handle_info_flags(args: argparse.Namespace, cfg: Config) -> bool:
    """Handle --print-config / --dry-run (which also loads the benchmarks evaluation will read); True when the
    caller should exit."""
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return True
    if args.dry_run:
        from megatron_rence.data.benchmarks import check_benchmarks

        try:
            check_benchmarks(cfg.eval, cfg.data.synthetic)  # the files evaluation will read exist and parse
        except ValueError as exc:
            print(f"error: {args.recipe}: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"recipe {args.recipe} is valid ({cfg.objective.name}, {cfg.model.arch}, "
              f"tp={cfg.parallel.tp} pp={cfg.parallel.pp} cp={cfg.parallel.cp})")
        return True
    return False
