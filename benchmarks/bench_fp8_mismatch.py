"""What FP8 rollout weights (`rollout.sglang.fp8_weights`) cost in train/engine log-prob mismatch, per model.

    python benchmarks/bench_fp8_mismatch.py --hf-path /models/Qwen2.5-1.5B-Instruct [--dtype bf16]
        [--device cuda] [--prompts 8 --prompt-len 64 --new-tokens 128] [--seed 0]
    python benchmarks/bench_fp8_mismatch.py --shape qwen2.5-0.5b        # random weights of that shape

Continuations are sampled (temperature 1) from the exact model; then every response token's log-prob is
computed three ways with one teacher-forced forward each:
  exact      the model as the trainer holds it (the reference);
  w8         the linear weights rounded to block FP8 (128 x 128, weights/quantize.py), activations exact;
  w8a8       also each linear input rounded per token per 128-column group, as SGLang's block-FP8 GEMMs do
             (quantize.emulate_w8a8). This is what an FP8 SGLang engine samples from, up to kernel order.
Columns: mismatch/* of rollout/mismatch.py against `exact` (abs mean and max of the per-token log-prob
difference, KL k3 estimate). Random weights give a nearly flat next-token distribution and so understate the
mismatch of a trained model: pass --hf-path for a real figure (no download happens here).
"""
from __future__ import annotations

import argparse
import time

import torch

SHAPES = {  # name -> transformers Qwen2Config fields (the published architectures, random weights)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_model(args):
    import transformers

    if args.hf_path:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_path)
    else:
        torch.manual_seed(args.seed)
        config = transformers.Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(DTYPES[args.dtype])  # (transformers 4.x names the loading dtype argument differently)


def round_linear_weights(model) -> int:
    """Replace every block-FP8 linear weight by its FP8-rounded value in place; returns how many."""
    from megatron_rence.weights.quantize import dequantize_block_fp8, is_quantized_linear, quantize_block_fp8

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_quantized_linear(name):
                param.copy_(dequantize_block_fp8(*quantize_block_fp8(param)).to(param.dtype))
                count += 1
    return count


@torch.no_grad()
def response_logprobs(model, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[N, new_tokens] fp32 log-probs of the tokens after the prompt."""
    logits = model(sequences).logits[:, prompt_len - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, prompt_len:, None]).squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-path", help="a Hugging Face model directory (else random weights of --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from megatron_rence.rollout.mismatch import mismatch_metrics
    from megatron_rence.weights.quantize import emulate_w8a8

    start = time.perf_counter()
    model = load_model(args).to(args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, model.config.vocab_size, (args.prompts, args.prompt_len), generator=g).to(args.device)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        sequences = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                   temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, pad_token_id=0)
    exact = response_logprobs(model, sequences, args.prompt_len)
    rounded = round_linear_weights(model)
    w8 = response_logprobs(model, sequences, args.prompt_len)
    hooks = emulate_w8a8(model)
    w8a8 = response_logprobs(model, sequences, args.prompt_len)
    for hook in hooks:
        hook.remove()

    source = args.hf_path or f"random {args.shape}"
    print(f"model: {source}, {params / 1e6:.1f}M params, {args.dtype} on {args.device}; {rounded} linear weights "
          f"in block FP8; {exact.numel()} response tokens ({args.prompts} x {args.new_tokens}), "
          f"exact mean log-prob {exact.mean().item():.3f}; {time.perf_counter() - start:.1f} s")
    print(f"{'engine':8s} {'abs_mean':>10s} {'abs_max':>10s} {'kl (k3)':>10s}")
    for name, values in (("w8", w8), ("w8a8", w8a8)):
        m = mismatch_metrics(values, exact, torch.ones_like(exact, dtype=torch.bool))
        print(f"{name:8s} {m['mismatch/abs_mean']:10.2e} {m['mismatch/abs_max']:10.2e} {m['mismatch/kl']:10.2e}")


if __name__ == "__main__":
    main()
