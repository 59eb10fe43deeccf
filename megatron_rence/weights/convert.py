"""Import Hugging Face safetensors into a Megatron distributed checkpoint at any TP/PP, and export one back.

Import: every rank of a `tp x pp` layout builds its own model shard (`megatron.model.build_model`), fills
it from the safetensors files (each full Megatron tensor is built by the architecture's mapping, then
TP-split with the fc1 re-chunk rule), and all ranks write one dist checkpoint through
`megatron.checkpoint.save` (`OUT/iter_0000000` + `OUT/latest`); dist_checkpointing reshards on load, so
the result loads at any TP/PP. The source's config.json, generation config and tokenizer files are copied
to `OUT/hf/`. Export: load a checkpoint at a `tp x pp` layout and stream it through the per-step sync
(`sync.iter_hf_buckets`), one safetensors shard per bucket, plus config.json and tokenizer files.
Without torchrun the `tp * pp` ranks are local processes spawned here (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.weights.hf_config import model_config_from_hf, to_hf_config
from megatron_rence.weights.mapping import dims_of, get_mapping
from megatron_rence.weights.plan import global_name, split_tp_shards, unwrap
from megatron_rence.weights.portable import make_portable
from megatron_rence.weights.quantize import BLOCK_FP8_CONFIG, quantize_bucket

HF_SIDE_DIR = "hf"  # OUT/hf: the source model's config.json and tokenizer files
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
              "added_tokens.json")
TOKENIZER_FILES = tuple(f for f in SIDE_FILES if f != "config.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class HFCheckpoint:
    """Lazy reader of an HF safetensors checkpoint: `model.safetensors` or a sharded index."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {self.dir} does not exist")
        index, single = self.dir / "model.safetensors.index.json", self.dir / "model.safetensors"
        if index.is_file():
            self.files = {name: self.dir / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: neither model.safetensors nor model.safetensors.index.json "
                                    "(only safetensors checkpoints are supported)")
        for path in sorted(set(self.files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{index}: shard {path.name} is missing")
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        """The full tensor `name` (read from its shard; the shard stays memory-mapped)."""
        if name not in self.files:
            raise ValueError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_tensor(name)


def model_config_for(hf_dir: str | os.PathLike, make_vocab_size_divisible_by: int = 128,
                     dtype: Optional[str] = None) -> ModelConfig:
    """The recipe's model section for an HF checkpoint (dtype: `dtype`, else config.json's, else bf16)."""
    fields = model_config_from_hf(hf_dir)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    hf_dtype = _HF_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")), "bf16")
    return ModelConfig(**fields, hf_path=str(hf_dir), make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       dtype=dtype or hf_dtype)


def check_layout(model_cfg: ModelConfig, tp: int, pp: int) -> None:
    """ValueError naming the option when the model cannot be split `tp x pp`."""
    m = model_cfg
    for what, count, by, flag in (("num_attention_heads", m.num_attention_heads, tp, "--tp"),
                                  ("num_query_groups", m.num_query_groups, tp, "--tp"),
                                  ("ffn_hidden_size", m.ffn_hidden_size, tp, "--tp"),
                                  ("num_layers", m.num_layers, pp, "--pp")):
        if by < 1 or count % by:
            raise ValueError(f"{flag}={by} does not divide the model's {what}={count}")


@torch.no_grad()
def load_hf_into_model(model_chunks: list, model_cfg: ModelConfig, vocab_size: int, get: Callable[[str], torch.Tensor],
                       pstate, progress: bool = False) -> int:
    """Fill this rank's parameters from full HF tensors (`get(hf_name)`); returns the number filled.

    Shapes are checked per parameter: a mismatch names the Megatron parameter, the HF tensors it comes
    from, and both shapes.
    """
    mapping = get_mapping(model_cfg.arch)
    mapping.check(model_cfg)
    dims = dims_of(model_cfg, vocab_size)
    params = [(unwrap(chunk), name, p) for chunk in model_chunks for name, p in unwrap(chunk).named_parameters()]
    for module, local_name, param in tqdm(params, desc="import", disable=not progress, unit="tensor"):
        name = global_name(module, local_name)
        tp_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        full_shape = list(param.shape)
        if tp_dim is not None:
            full_shape[tp_dim] *= pstate.tp_size
        used: list[tuple[str, tuple]] = []

        def fetch(hf_name: str) -> torch.Tensor:
            tensor = get(hf_name)
            used.append((hf_name, tuple(tensor.shape)))
            return tensor

        try:
            full = mapping.from_hf_tensor(name, fetch, dims, full_shape[0] if "embedding" in name or
                                          name == "output_layer.weight" else 0)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc} (from {_describe(used)})") from None
        if list(full.shape) != full_shape:
            raise ValueError(f"shape mismatch for {name}: the HF tensors {_describe(used)} give "
                             f"{tuple(full.shape)}, the model expects {tuple(full_shape)}")
        shard = split_tp_shards(full, tp_dim, local_name.endswith("linear_fc1.weight"), pstate.tp_size)[pstate.tp_rank]
        param.copy_(shard)
    return len(params)


def init_from_hf(model_chunks: list, model_cfg: ModelConfig, vocab_size: int, pstate) -> int:
    """Fill this rank's shard of a freshly built model from `model_cfg.hf_path` (the start of a run).

    Every rank reads only the tensors its parameters need (memory-mapped safetensors), so no rank ever
    holds the whole model. Returns the number of parameters filled.
    """
    ckpt = HFCheckpoint(model_cfg.hf_path)
    hf_vocab = ckpt.get("model.embed_tokens.weight").shape[0]
    if hf_vocab != vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} but {ckpt.dir}'s embedding has {hf_vocab} rows "
                         "(leave model.vocab_size at 0 to take config.json's)")
    return load_hf_into_model(model_chunks, model_cfg, vocab_size, ckpt.get, pstate, progress=pstate.rank == 0)


def _describe(used: list[tuple[str, tuple]]) -> str:
    return ", ".join(f"{n} {list(s)}" for n, s in used) or "no HF tensor"


def copy_side_files(src: Path, dst: Path, names=SIDE_FILES) -> list[str]:
    """Copy the config / tokenizer files present in `src` to `dst`; returns the names copied."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = [n for n in names if (src / n).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    return copied


def run_ranks(fn: Callable, world_size: int, *args) -> None:
    """Run `fn(*args)` on every rank: in this process (one rank, or under torchrun) or on spawned local ranks."""
    if world_size == 1 or "RANK" in os.environ:
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) != world_size:
            raise ValueError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but the layout needs "
                             f"{world_size} ranks (--tp x --pp)")
        fn(*args)
        return
    import torch.multiprocessing as mp

    from megatron_rence.megatron.parallel import free_port

    mp.spawn(_spawned, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _spawned(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    fn(*args)


def _initialize(parallel_cfg: ParallelConfig):
    from megatron_rence.megatron import parallel

    owns_world = not torch.distributed.is_initialized()
    return parallel.initialize(parallel_cfg, seed=0), owns_world


def _finish(owns_world: bool) -> None:
    from megatron_rence.megatron import parallel

    parallel.destroy(process_group=owns_world)


def import_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
              make_vocab_size_divisible_by: int = 128, dtype: Optional[str] = None) -> Path:
    """HF safetensors -> a Megatron dist checkpoint under `out_dir` (loadable at any TP/PP); returns its path."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    HFCheckpoint(hf_dir)  # fail early on missing files
    model_cfg = model_config_for(hf_dir, make_vocab_size_divisible_by, dtype)
    check_layout(model_cfg, tp, pp)
    run_ranks(_import_rank, tp * pp, str(hf_dir), str(out_dir), asdict(model_cfg), tp, pp)
    if int(os.environ.get("RANK", "0")) == 0:
        copy_side_files(hf_dir, out_dir / HF_SIDE_DIR)
    return out_dir / "iter_0000000"


def _import_rank(hf_dir: str, out_dir: str, model_fields: dict, tp: int, pp: int) -> None:
    from megatron_rence.megatron import checkpoint
    from megatron_rence.megatron.model import build_model

    model_cfg, parallel_cfg = ModelConfig(**model_fields), ParallelConfig(tp=tp, pp=pp)
    pstate, owns_world = _initialize(parallel_cfg)
    try:
        chunks = build_model(model_cfg, parallel_cfg, model_cfg.vocab_size)
        load_hf_into_model(chunks, model_cfg, model_cfg.vocab_size, HFCheckpoint(hf_dir).get, pstate,
                           progress=pstate.rank == 0)
        dtype = DTYPES[model_cfg.dtype]
        for chunk in chunks:  # the checkpoint holds the training dtype (CPU models are built in fp32)
            chunk.to(dtype)
        checkpoint.save(out_dir, 0, chunks, run_state={"step": 0, "source": hf_dir, "model": model_fields})
    finally:
        _finish(owns_world)


def find_model_config(ckpt: str | os.PathLike, recipe: Optional[str] = None) -> tuple[ModelConfig, int, Optional[Path]]:
    """(model section, unpadded vocab size, directory with tokenizer files or None) for a checkpoint.

    Looked up in order: `recipe`; `<root>/hf/config.json` (written by `import_hf`); the run's resolved
    recipe `<root>/../config.yaml` (written by training; checkpoints live in `<run_dir>/checkpoints`).
    """
    path = Path(ckpt)
    root = path.parent if path.name.startswith("iter_") else path
    side = root / HF_SIDE_DIR
    if recipe is None and (side / "config.json").is_file():
        model_cfg = model_config_for(side)
        return model_cfg, model_cfg.vocab_size, side
    recipe_path = Path(recipe) if recipe is not None else root.parent / "config.yaml"
    if not recipe_path.is_file():
        raise FileNotFoundError(f"no model description for {path}: tried {side / 'config.json'} and "
                                f"{recipe_path} (pass --recipe)")
    from megatron_rence.data.tokenizer import load_tokenizer
    from megatron_rence.recipe import load_recipe

    model_cfg = load_recipe(recipe_path).model
    vocab_size = model_cfg.vocab_size or len(load_tokenizer(model_cfg))
    tokenizer_dir = Path(model_cfg.tokenizer) if model_cfg.tokenizer != "synthetic" else None
    return model_cfg, vocab_size, tokenizer_dir


def export_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, recipe: Optional[str] = None, tp: int = 1,
              pp: int = 1, dtype: Optional[str] = None, shard_bytes: int = 4 << 30,
              quant: Optional[str] = None, allow_unverified: bool = False) -> Path:
    """A Megatron checkpoint (root or iter_* dir) -> HF safetensors shards + config.json + tokenizer files.

    The checkpoint must carry its sha256 manifest (checked here, before any rank starts) unless
    `allow_unverified` (a checkpoint from before checksums).

    `quant="fp8_block"`: the linear weights as 128 x 128 block-FP8 (`weights.quantize`, SGLang's `fp8`
    method, config.json `quantization_config` = `BLOCK_FP8_CONFIG`); other tensors in `dtype`."""
    from megatron_rence.megatron.checkpoint import resolve_intact

    if quant not in (None, "fp8_block"):
        raise ValueError(f"export_hf: quant={quant!r} (only fp8_block; modelopt's formats are in "
                         "megatron_rence.megatron.quantized_export)")

    ckpt_dir = resolve_intact(ckpt, allow_unverified)
    model_cfg, vocab_size, side = find_model_config(ckpt, recipe)
    check_layout(model_cfg, tp, pp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_dtype = dtype or model_cfg.dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"--dtype {out_dtype!r}: expected one of {', '.join(DTYPES)}")
    run_ranks(_export_rank, tp * pp, str(ckpt_dir), str(out), asdict(model_cfg), vocab_size, tp, pp, out_dtype,
              shard_bytes, quant == "fp8_block", allow_unverified)
    if int(os.environ.get("RANK", "0")) != 0:
        return out
    source_config = json.loads((side / "config.json").read_text()) if side and (side / "config.json").is_file() else {}
    hf_config = to_hf_config(replace(model_cfg, dtype=out_dtype), vocab_size,
                             source_config.get("eos_token_id"), source_config.get("pad_token_id"))
    if "bos_token_id" in source_config:
        hf_config.bos_token_id = source_config["bos_token_id"]
    if quant == "fp8_block":
        hf_config.quantization_config = dict(BLOCK_FP8_CONFIG)
    hf_config.save_pretrained(out)
    if side is not None:
        copy_side_files(side, out, TOKENIZER_FILES)
    make_portable(out)  # transformers 4.57.1 (SGLang's) reads the same RoPE base and tokenizer
    return out


def _export_rank(ckpt_dir: str, out_dir: str, model_fields: dict, vocab_size: int, tp: int, pp: int,
                 out_dtype: str, shard_bytes: int, fp8_block: bool = False, allow_unverified: bool = False) -> None:
    from megatron_rence.megatron import checkpoint
    from megatron_rence.megatron.model import build_model
    from megatron_rence.weights.sync import iter_hf_buckets

    model_cfg, parallel_cfg = ModelConfig(**model_fields), ParallelConfig(tp=tp, pp=pp)
    pstate, owns_world = _initialize(parallel_cfg)
    try:
        chunks = build_model(model_cfg, parallel_cfg, vocab_size)
        checkpoint.load(ckpt_dir, chunks, allow_unverified=allow_unverified)
        dtype = DTYPES[out_dtype]
        train_itemsize = next(chunks[0].parameters()).element_size()
        bucket_bytes = max(1, shard_bytes * train_itemsize // dtype.itemsize)  # shards are measured in out_dtype
        writer = SafetensorsWriter(Path(out_dir), dtype, fp8_block) if pstate.rank == 0 else None
        buckets = iter_hf_buckets(chunks, model_cfg, vocab_size, bucket_bytes, pstate, dst_ranks=(0,))
        for bucket in tqdm(buckets, desc="export", unit="shard", disable=writer is None):
            writer.write(bucket)
        if writer is not None:
            writer.finish()
    finally:
        _finish(owns_world)


class SafetensorsWriter:
    """Writes one safetensors shard per bucket, then the HF index (or a single `model.safetensors`).
    `fp8_block`: each linear weight is written block-FP8 quantized (from its `dtype` value) + `weight_scale_inv`."""

    def __init__(self, out_dir: Path, dtype: torch.dtype, fp8_block: bool = False):
        self.out_dir, self.dtype, self.fp8_block = out_dir, dtype, fp8_block
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def write(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        tensors = {}
        for name, tensor in bucket:
            assert name not in tensors, f"{name} written twice"
            # own storage per tensor: safetensors refuses views that share memory (q/k/v of one linear_qkv)
            tensors[name] = tensor.detach().to("cpu", self.dtype).contiguous().clone()
        if self.fp8_block:
            tensors = dict(quantize_bucket(list(tensors.items())))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        path = self.out_dir / f"model-part-{len(self.shards) + 1:05d}.safetensors.tmp"
        save_file(tensors, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(tensors)))

    def finish(self) -> None:
        """Name the shards `model-0000i-of-0000n.safetensors` (or `model.safetensors`) and write the index."""
        n = len(self.shards)
        if n == 1:
            os.replace(self.shards[0][0], self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
