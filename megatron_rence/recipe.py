"""Load a recipe: YAML with `base:` inheritance (deep merge), dotted CLI overrides, typed coercion, validation.

    cfg = load_recipe("recipes/demo_cpu.yaml", ["objective.name=grpo", "rollout.num_samples=8"])

Every error is a ConfigError naming the dotted key and the file (or "override" for a CLI override).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Union

import yaml

from megatron_rence.config import Config, ConfigError, ConfigWarning, check_context, validate
from megatron_rence.ineffective import ineffective_settings

_MAX_BASE_DEPTH = 16


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Resolve `path` (following `base:`), apply `overrides` ("a.b=value"), build and validate a Config."""
    path = Path(path)
    raw, sources = _load_with_bases(path, depth=0)
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        sources[key] = f"command-line override (recipe {path})"
    cfg = build(Config, raw, prefix="", sources=sources, default_source=str(path))
    fill_model_from_hf(cfg, raw.get("model") or {}, sources, str(path))
    validate(cfg, source=str(path), where=lambda key: _where(key, sources, str(path)))
    for key, why in ineffective_settings(cfg):
        warnings.warn(f"{path}: {key}: {why}", ConfigWarning, stacklevel=2)
    return cfg


def fill_model_from_hf(cfg: Config, raw_model: dict, sources: dict[str, str], default_source: str) -> None:
    """With `model.hf_path` readable here, its config.json fills the architecture fields of `cfg.model`.

    A field set next to `hf_path` (same file) or on the command line must agree with config.json
    (ConfigError naming the key otherwise); one inherited from a base recipe is replaced;
    `vocab_size` 0 becomes config.json's (the embedding rows, which may exceed the tokenizer's length).
    When the directory is not readable here (a login node), the recipe's fields stand as written.
    """
    m = cfg.model
    if m.hf_path is None or not (Path(m.hf_path) / "config.json").is_file():
        return
    from megatron_rence.weights.hf_config import model_config_from_hf

    try:
        fields = model_config_from_hf(m.hf_path)
    except ValueError as exc:
        raise ConfigError(f"{_where('model.hf_path', sources, default_source)}: model.hf_path: {exc}") from None
    hf_source = sources.get("model.hf_path", default_source)
    for name, value in fields.items():
        given = raw_model.get(name)
        source = sources.get(f"model.{name}", default_source)
        if source != hf_source and not source.startswith("command-line"):
            given = None  # inherited from a base recipe: config.json's value replaces it
        if name == "vocab_size" and not given:
            given = None
        if name == "max_position_embeddings" and given is not None:
            continue  # a shorter context than the model supports is the recipe's choice
        if given is not None and not _same(getattr(m, name), value):
            raise ConfigError(f"{_where(f'model.{name}', sources, default_source)}: model.{name}: the recipe says "
                              f"{getattr(m, name)!r} but {m.hf_path}/config.json gives {value!r} "
                              f"(remove the key to take config.json's value)")
        setattr(m, name, value)

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{_where(key, sources, default_source)}: {key}: {msg}")

    check_context(cfg, fail)  # against the context config.json gives (validate skips it with hf_path)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, default_flow_style=False)


def save_resolved(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write the resolved recipe to <run_dir>/config.yaml atomically."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, out)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error naming both lines (PyYAML
    itself keeps the last one silently: a second `train:` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges are PyYAML's own business
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: construct_mapping reports it
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} at line {line} (first at line {first}): a recipe "
                        f"gives each key and section once", key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.constructor.ConstructorError as exc:
        if exc.problem and exc.problem.startswith("duplicate key"):
            raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _load_with_bases(path: Path, depth: int) -> tuple[dict, dict[str, str]]:
    if depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: base: chain deeper than {_MAX_BASE_DEPTH} (a cycle?)")
    data = _read_yaml(path)
    base = data.pop("base", None)
    merged: dict = {}
    sources: dict[str, str] = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: must be a file path, got {base!r}")
        base_path = (path.parent / base).resolve()
        merged, sources = _load_with_bases(base_path, depth + 1)
    _deep_merge(merged, data)
    for key in _leaf_keys(data):
        sources[key] = str(path)
    return merged, sources


def _deep_merge(dst: dict, src: dict) -> None:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_merge(dst[key], value)
        else:
            dst[key] = value


def _leaf_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.extend(_leaf_keys(value, dotted + ".") if isinstance(value, dict) else [dotted])
    return keys


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. objective.name=grpo")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _where(key: str, sources: dict[str, str], default_source: str) -> str:
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    for known, source in sources.items():  # a section whose leaves came from one place
        if known.startswith(key + "."):
            return source
    return default_source


def build(cls: type, raw: Any, prefix: str, sources: dict[str, str], default_source: str):
    """Build dataclass `cls` from a mapping, coercing each value to its annotated type."""
    where = _where(prefix.rstrip("."), sources, default_source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or '<top>'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            dotted = f"{prefix}{key}"
            raise ConfigError(f"{_where(dotted, sources, default_source)}: {dotted}: unknown key "
                              f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name in raw:
            dotted = f"{prefix}{name}"
            kwargs[name] = _coerce(hints[name], raw[name], dotted, sources, default_source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, sources: dict[str, str], default_source: str) -> Any:
    def fail(expected: str):
        raise ConfigError(f"{_where(key, sources, default_source)}: {key}: expected {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".", sources, default_source)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for arg in inner:
            try:
                return _coerce(arg, value, key, sources, default_source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            fail("one of " + ", ".join(repr(c) for c in choices))
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and value.strip() == "":
            return []
        if not isinstance(value, list):
            value = [value] if isinstance(value, (str, int, float)) else fail("a list")
        return [_coerce(item_tp, v, f"{key}[{i}]", sources, default_source) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            fail("a mapping")
        return {str(k): _coerce(val_tp, v, f"{key}.{k}", sources, default_source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else fail("an integer")
            except ValueError:
                pass
        fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        fail("a number")
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            fail("a string")
        return str(value)
    raise AssertionError(f"unsupported config type {tp!r} for {key}")
