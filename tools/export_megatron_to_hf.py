"""Export a Megatron checkpoint (from training or from convert_hf_to_megatron.py) to Hugging Face safetensors.

    python tools/export_megatron_to_hf.py CKPT OUT_DIR [--recipe RECIPE] [--tp N] [--pp M] [--dtype bf16]

CKPT is a checkpoint root (its `latest` is used) or one `iter_XXXXXXX` directory. The model is described
by --recipe, else `CKPT/hf/config.json` (converted checkpoints), else the run's `config.yaml` next to its
`checkpoints/` directory. OUT_DIR gets safetensors shards (+ index), config.json and tokenizer files.
"""
import argparse
import sys

from megatron_rence.weights.convert import export_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint root or iter_XXXXXXX directory")
    parser.add_argument("out_dir", help="output directory for the HF checkpoint")
    parser.add_argument("--recipe", default=None, help="recipe YAML describing the model")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the export")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks doing the export")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the safetensors (default: the model section's)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size in GB")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.ckpt, args.out_dir, recipe=args.recipe, tp=args.tp, pp=args.pp, dtype=args.dtype,
                        shard_bytes=int(args.shard_gb * 1e9))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
