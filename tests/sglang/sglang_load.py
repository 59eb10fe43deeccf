"""Run as a script (a fresh interpreter: SGLang's own process-global distributed state): build SGLang
0.5.5.post3's real model classes on CPU for each case of a torch.save'd list, feed each our weight stream
through the model's own `load_weights`, and compare every parameter with what the HF checkpoint says it
must hold. Prints one JSON line per case: {"case", "checked": [names], "mismatched": [...], "unset": [...]}.

    python tests/sglang/sglang_load.py CASES.pt PORT

Each case: {"name", "model_dir" (written by SGLangEngine's write_model_dir), "dtype" (SGLang's: float32, or
bfloat16 for FP8, which SGLang refuses in float32), "stream" [(name, tensor)], "expected" {sglang param name:
tensor}}.
"""
import json
import sys

import torch


def init_sglang(model_dir: str, port: int):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.layers.dp_attention import initialize_dp_attention
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    args = ServerArgs(model_path=model_dir, device="cpu", dtype="float32", load_format="dummy",
                      disable_cuda_graph=True, skip_server_warmup=True)
    set_global_server_args_for_scheduler(args)
    init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(tensor_model_parallel_size=1)
    initialize_dp_attention(server_args=args, model_config=ModelConfig.from_server_args(args))


def build(model_dir: str, dtype: str):
    """SGLang's model class for `model_dir` (its `architectures`), with its quantization config if any."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import _get_quantization_config
    from sglang.srt.model_loader.utils import get_model_architecture, set_default_torch_dtype
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=model_dir, device="cpu", dtype=dtype, load_format="dummy",
                      disable_cuda_graph=True, skip_server_warmup=True)
    config = ModelConfig.from_server_args(args)
    model_class, _ = get_model_architecture(config)
    quant = _get_quantization_config(config, LoadConfig(load_format="dummy"),
                                     getattr(model_class, "packed_modules_mapping", {}))
    with set_default_torch_dtype(config.dtype), torch.device("cpu"):  # as SGLang's model loader does
        model = model_class(config=config.hf_config, quant_config=quant)
    return model


def check(case: dict) -> dict:
    model = build(case["model_dir"], case["dtype"])
    params = dict(model.named_parameters())
    sentinel = float("nan")
    with torch.no_grad():
        for p in params.values():  # anything load_weights leaves alone stays NaN (FP8: its max value)
            p.fill_(sentinel if p.dtype.is_floating_point and p.element_size() > 1 else 0)
    model.load_weights(iter(case["stream"]))
    mismatched, checked = [], []
    for name, want in case["expected"].items():
        got = params[name].data
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            got = got[: want.shape[0]]  # SGLang pads the vocabulary rows (to a multiple of 64)
        checked.append(name)
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got.view(-1).view(torch.uint8),
                                                                                  want.reshape(-1).view(torch.uint8)):
            mismatched.append(f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}")
    unset = sorted(set(params) - set(case["expected"]))
    return {"case": case["name"], "checked": checked, "mismatched": mismatched, "unset": unset}


def main(path: str, port: int) -> None:
    cases = torch.load(path, weights_only=False)
    init_sglang(cases[0]["model_dir"], port)
    for case in cases:
        print(json.dumps(check(case)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
