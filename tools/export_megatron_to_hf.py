"""Export a Megatron checkpoint (from training or from convert_hf_to_megatron.py) to Hugging Face safetensors.

    python tools/export_megatron_to_hf.py CKPT OUT_DIR [--recipe RECIPE] [--tp N] [--pp M] [--dtype bf16]
    python tools/export_megatron_to_hf.py CKPT OUT_DIR --quant fp8 [--recipe RECIPE] [--calib-prompts 16]

CKPT is a checkpoint root (its `latest` is used) or one `iter_XXXXXXX` directory. The model is described
by --recipe, else `CKPT/hf/config.json` (converted checkpoints), else the run's `config.yaml` next to its
`checkpoints/` directory. OUT_DIR gets safetensors shards (+ index), config.json and tokenizer files.

--quant fp8 | nvfp4: NVIDIA Model Optimizer (nvidia-modelopt, the `export` extra) calibrates on the first
--calib-prompts prompts of the recipe's data (--recipe, else the run's config.yaml) and writes the checkpoint
with its exporter (hf_quant_config.json, config.json quantization_config quant_method=modelopt), as SGLang
(`--quantization modelopt`, picked up from the config), vLLM and TensorRT-LLM load it. One process, TP=1.
nvfp4 needs a GPU. --quant fp8_block: 128x128 block-FP8 linear weights written by our own converter (SGLang's
`fp8` method, the format of the official *-FP8 Qwen3 checkpoints); no calibration, any --tp/--pp.
"""
import argparse
import sys

from megatron_rence.weights.convert import export_hf

QUANTS = ("fp8", "nvfp4", "fp8_block")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt", help="checkpoint root or iter_XXXXXXX directory")
    parser.add_argument("out_dir", help="output directory for the HF checkpoint")
    parser.add_argument("--recipe", default=None, help="recipe YAML describing the model (and, with --quant, "
                                                      "the calibration data)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the export")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks doing the export")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the unquantized tensors (default: the model section's)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="safetensors shard size in GB")
    parser.add_argument("--quant", choices=QUANTS, default=None, help="quantized export (see the docstring)")
    parser.add_argument("--calib-prompts", type=int, default=16, help="prompts modelopt calibrates on")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="export a checkpoint without its sha256 manifest.json (one written before checksums)")
    args = parser.parse_args(argv)
    try:
        if args.quant in ("fp8", "nvfp4"):
            if args.tp != 1 or args.pp != 1:
                raise ValueError(f"--quant {args.quant} runs in one process: drop --tp/--pp (the checkpoint "
                                 "is resharded to TP=1 on load)")
            from megatron_rence.megatron.quantized_export import export_quantized

            out = export_quantized(args.ckpt, args.out_dir, args.quant, recipe=args.recipe,
                                   calib_prompts=args.calib_prompts, dtype=args.dtype,
                                   allow_unverified=args.allow_unverified)
        else:
            out = export_hf(args.ckpt, args.out_dir, recipe=args.recipe, tp=args.tp, pp=args.pp, dtype=args.dtype,
                            shard_bytes=int(args.shard_gb * 1e9), quant=args.quant,
                            allow_unverified=args.allow_unverified)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointLoadError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
