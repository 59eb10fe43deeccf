"""Convert a Hugging Face safetensors checkpoint (Llama-3, Qwen2.5, Qwen3) into a Megatron dist checkpoint.

    python tools/convert_hf_to_megatron.py HF_DIR OUT [--tp N] [--pp M] [--dtype bf16]

OUT gets `iter_0000000/` (megatron dist_checkpointing, the layout `megatron/checkpoint.py` writes and
loads), `latest`, and `hf/` (the source's config.json and tokenizer files). The checkpoint loads at any
TP/PP; --tp/--pp only choose how many local processes share the conversion's memory. Start training from
it with `checkpoint.load=OUT` (and `model.tokenizer=OUT/hf`, `model.vocab_size=<config.json's vocab_size>`).
"""
import argparse
import sys

from megatron_rence.weights.convert import import_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir", help="directory with config.json and model.safetensors[.index.json]")
    parser.add_argument("out", help="output checkpoint root")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks doing the conversion")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks doing the conversion")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype stored in the checkpoint (default: config.json's, else bf16)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        path = import_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                         make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
