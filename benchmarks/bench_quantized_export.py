"""SmolLM2-135M-Instruct through the export paths: our converter vs modelopt's, and the modelopt FP8 export vs the
source model in transformers (logits and greedy answers on the recipe's held-out problems). Prints figures.

    python benchmarks/bench_quantized_export.py [--model models/smollm2-135m-instruct] [--problems 32]

Needs the prepared model (`make demo-real` or tools/prepare_smollm2.py) and the `export` extra. Steps: import
the HF folder as a Megatron checkpoint with recipes/smollm2_cpu.yaml as the run's config.yaml; export it with
ours and with modelopt's exporter (unquantized) and compare every tensor; export FP8 with
`tools/export_megatron_to_hf.py --quant fp8` (16 calibration prompts of the recipe's training data); then, on
the held-out problems (never in the calibration set), compare the source model with the dequantized FP8 model
(static FP8 inputs, as SGLang computes it): teacher-forced next-token logits over prompt + source answer,
and greedy answers (max_new_tokens as in the recipe's eval) graded with math-verify.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    return {k: v for f in files for k, v in load_file(path / f).items()}


def compare_converters(hf: Path, ckpt: Path, work: Path) -> None:
    from modelopt.torch.export import export_mcore_gpt_to_hf

    from megatron_rence.config import ParallelConfig
    from megatron_rence.megatron import checkpoint, parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.megatron.quantized_export import write_source_dir
    from megatron_rence.weights.convert import export_hf, model_config_for

    ours = load_dir(export_hf(ckpt, work / "ours"))
    cfg = model_config_for(ckpt / "hf")
    parallel.initialize(ParallelConfig(), seed=0)
    try:
        model = build_model(cfg, ParallelConfig(), cfg.vocab_size)[0]
        checkpoint.load(ckpt, [model])
        write_source_dir(work / "mo-source", cfg, cfg.vocab_size, cfg.dtype, ckpt / "hf")
        export_mcore_gpt_to_hf(model, str(work / "mo-source"), dtype=torch.float32, export_dir=str(work / "mo"))
    finally:
        parallel.destroy()
    theirs = load_dir(work / "mo")
    differ = [n for n in ours if n not in theirs or theirs[n].shape != ours[n].shape or not torch.equal(theirs[n], ours[n])]
    print(f"converters: ours {len(ours)} tensors, modelopt {len(theirs)}, names equal {sorted(ours) == sorted(theirs)}, "
          f"tensors differing {len(differ)} {differ[:4]}")


def quantize(run: Path, out: Path, calib: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "tools/export_megatron_to_hf.py", str(run / "checkpoints"), str(out),
                           "--quant", "fp8", "--calib-prompts", str(calib)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - start


def fp8_model(out: Path, static_inputs: bool = True):
    from megatron_rence.weights.quantize import dequantize_modelopt_fp8, static_fp8_inputs

    plain, scales = dequantize_modelopt_fp8(load_dir(out))
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config),
                                                          dtype=torch.float32).eval()
    model.load_state_dict(plain, strict=False)  # lm_head is tied to the embedding
    if static_inputs:
        static_fp8_inputs(model, scales)
    return model


def block_model(hf: Path, ckpt: Path, work: Path):
    """`--quant fp8_block` of the same checkpoint, dequantized, with SGLang's per-token-group FP8 inputs."""
    from megatron_rence.weights.convert import export_hf
    from megatron_rence.weights.quantize import dequantize_bucket, emulate_w8a8

    out = export_hf(ckpt, work / "fp8_block", quant="fp8_block")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    model.load_state_dict(dict(dequantize_bucket(list(load_dir(out).items()), torch.float32)), strict=False)
    emulate_w8a8(model)
    return model


@torch.no_grad()
def prompt_logits(source, model, prompts: list[list[int]]) -> str:
    rel, top1 = [], []
    for ids in prompts:
        a, b = source(torch.tensor([ids])).logits[0], model(torch.tensor([ids])).logits[0]
        rel.append(float((b - a).norm() / a.norm()))
        top1.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return f"relative L2 logit error {sum(rel) / len(rel):.4f}, top-1 agreement {sum(top1) / len(top1):.4f}"


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[list[int]], max_new: int) -> list[str]:
    answers = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


def compare_models(hf: Path, out: Path, recipe, num: int, generate: int, max_new: int, ckpt: Path) -> None:
    from megatron_rence.data.benchmarks import load_benchmark
    from megatron_rence.data.templates import encode_prompt, render_prompt
    from megatron_rence.rewards.math import grade

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    records = load_benchmark(recipe.eval.benchmarks[0], recipe.data.synthetic)[0][:num]
    prompts = [encode_prompt(render_prompt(r["problem"], tokenizer, recipe.data.template, recipe.data.instruction),
                             tokenizer, recipe.data.template) for r in records]
    source = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    quant = fp8_model(out)
    print(f"{len(prompts)} held-out prompts (teacher-forced over the prompt tokens):")
    print(f"  modelopt fp8, weight-only: {prompt_logits(source, fp8_model(out, static_inputs=False), prompts)}")
    print(f"  modelopt fp8, W8A8 (static per-tensor inputs): {prompt_logits(source, quant, prompts)}")
    print(f"  fp8_block, W8A8 (dynamic per-token-group inputs): "
          f"{prompt_logits(source, block_model(hf, ckpt, out.parent), prompts)}")
    if generate == 0:
        return
    start = time.perf_counter()
    ref_answers = greedy(source, tokenizer, prompts[:generate], max_new)
    fp8_answers = greedy(quant, tokenizer, prompts[:generate], max_new)
    gen_s = time.perf_counter() - start
    rel, top1 = [], []
    with torch.no_grad():
        for ids, answer in zip(prompts, ref_answers + [""] * (len(prompts) - generate)):
            seq = torch.tensor([ids + tokenizer(answer, add_special_tokens=False)["input_ids"]])
            a, b = source(seq).logits[0], quant(seq).logits[0]
            rel.append(float((b - a).norm() / a.norm()))
            top1.append(float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    fallbacks = tuple(recipe.reward.fallbacks)
    ref_ok = [grade(a, r["answer"], fallbacks).reward == 1.0 for a, r in zip(ref_answers, records)]  # first n
    fp8_ok = [grade(a, r["answer"], fallbacks).reward == 1.0 for a, r in zip(fp8_answers, records)]
    print(f"logits on {len(prompts)} held-out prompts (+ the source's greedy answer for the first {generate}): relative L2 error mean {sum(rel) / len(rel):.4f} "
          f"max {max(rel):.4f}; top-1 agreement mean {sum(top1) / len(top1):.4f} min {min(top1):.4f}")
    n = len(ref_answers)
    print(f"greedy answers (max_new_tokens={max_new}) identical {sum(x == y for x, y in zip(ref_answers, fp8_answers))}/{n}; "
          f"correct: source {sum(ref_ok)}/{n}, fp8 {sum(fp8_ok)}/{n}; "
          f"same grade {sum(x == y for x, y in zip(ref_ok, fp8_ok))}/{n} ({gen_s:.0f} s generating)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "models/smollm2-135m-instruct"))
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--generate", type=int, default=32, help="problems answered greedily by both models")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the recipe's eval length by default")
    parser.add_argument("--skip-converters", action="store_true", help="skip our-vs-modelopt export comparison")
    args = parser.parse_args()
    from megatron_rence.recipe import load_recipe, save_resolved
    from megatron_rence.weights.convert import import_hf

    hf = Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = load_recipe(REPO / "recipes/smollm2_cpu.yaml", [f"model.hf_path={hf}", f"model.tokenizer={hf}"])
        save_resolved(recipe, work / "run")
        import_hf(hf, work / "run" / "checkpoints")
        if not args.skip_converters:
            compare_converters(hf, work / "run" / "checkpoints", work)
        seconds = quantize(work / "run", work / "fp8", args.calib_prompts)
        size = sum(f.stat().st_size for f in (work / "fp8").glob("*.safetensors")) / 2**20
        print(f"fp8 export: {seconds:.0f} s (tools/export_megatron_to_hf.py --quant fp8, {args.calib_prompts} prompts); "
              f"safetensors {size:.0f} MiB (source {(hf / 'model.safetensors').stat().st_size / 2**20:.0f} MiB fp32)")
        compare_models(hf, work / "fp8", recipe, args.problems, min(args.generate, args.problems), args.max_new_tokens,
                       work / "run" / "checkpoints")


if __name__ == "__main__":
    main()
