"""Config machinery: YAML and dotted overrides onto nested dataclasses, strict keys, typed coercion.

A config is a dataclass whose fields all have defaults; a field is a scalar (`int`, `float`, `bool`, `str`,
`Path`), `X | None`, `Literal[...]`, `list[X]`, `dict[str, X]`, or a nested config dataclass (a section,
possibly `Section | None`). Each field is documented once, by the string literal directly under it.

    cfg = load_config(DPOConfig, "dpo.yaml", ["--optim.lr", "5e-7", "--train.batch_size=16"])

Values are applied in order: class defaults, `preset`, the YAML file, the overrides; then every section's
`validate()` runs. Problems raise `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from rlhf.errors import ConfigError

T = TypeVar("T")

_NULLS = {"null", "none", "~"}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_MISSING: Any = object()  # an override flag given without a value (`--model.trust_remote_code`)


# ---------------------------------------------------------------------------------------------- reflection
@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} from the string literal under each field, including inherited fields."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # defined in a REPL or exec: no source, no docs
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of the fields a config dataclass takes in its constructor."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def section_type(tp: Any) -> type | None:
    """The dataclass of a section field (`Section` or `Section | None`), else None."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if _is_union(tp):
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return sections[0] if len(sections) == 1 else None
    return None


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_optional(tp: Any) -> bool:
    return _is_union(tp) and type(None) in typing.get_args(tp)


def type_name(tp: Any) -> str:
    """A short, readable name for an annotation: `float`, `str | None`, `list[str]`, `{no,bf16,fp16}`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in field_types(cls).items():
        keys.append(prefix + name)
        sub = section_type(tp)
        if sub is not None:
            keys += _all_keys(sub, f"{prefix}{name}.")
    return keys


# ---------------------------------------------------------------------------------------------- coercion
def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    expected = type_name(tp)
    if typing.get_origin(tp) is Literal:
        expected = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return ConfigError(f"expected {expected}, got {value!r} ({type(value).__name__})", key=key)


def _coerce(value: Any, tp: Any, key: str, cli: bool) -> Any:
    """`value` (from YAML, or a string from the command line when `cli`) as an instance of annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        if type(None) in args and (value is None or (cli and isinstance(value, str) and value.lower() in _NULLS)):
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key, cli)
                except ConfigError:
                    pass
        raise _type_error(key, tp, value)
    if origin is Literal:
        for choice in args:
            try:
                if _coerce(value, type(choice), key, cli) == choice:
                    return choice
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin in (list, dict) and cli and isinstance(value, str):
        value, cli = _parse_cli_container(value, origin, key)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        (elem,) = args or (Any,)
        return [_coerce(v, elem, f"{key}[{i}]", cli) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, tp, value)
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, key, cli): _coerce(v, vt, f"{key}.{k}", cli) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _section_error(key, tp, value)
        obj = tp()
        _apply_mapping(obj, value, key + ".", cli)
        return obj
    if tp is bool:
        if isinstance(value, bool):
            return value
        if cli and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _type_error(key, tp, value)
    if tp in (int, float):
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str) and (cli or tp is float):  # YAML reads `1e-5` as a string
            try:
                return tp(value.strip())
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value)
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _type_error(key, tp, value)
    raise TypeError(f"config field {key!r}: unsupported annotation {tp!r}")


def _parse_cli_container(text: str, origin: type, key: str) -> tuple[Any, bool]:
    """A command-line list (`a,b,c` or a JSON list) or dict (a JSON object), and whether items are strings."""
    stripped = text.strip()
    if origin is list and not stripped.startswith("["):
        return [item.strip() for item in stripped.split(",") if item.strip()], True
    try:
        return json.loads(stripped), False
    except json.JSONDecodeError as exc:
        raise ConfigError(f"expected a JSON {origin.__name__}, got {text!r} ({exc.msg})", key=key) from None


# ---------------------------------------------------------------------------------------------- applying
def _section_error(key: str, cls: type, value: Any) -> ConfigError:
    keys = list(field_types(cls))
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return ConfigError(f"expected a section with keys ({shown}), got {value!r} ({type(value).__name__})", key=key)


def _suggest(cls: type, name: str) -> str | None:
    """The valid key closest to `name` at this level, else a deeper key whose last part is close (`optim.lr`)."""
    close = difflib.get_close_matches(name, list(field_types(cls)), n=1)
    if close:
        return close[0]
    deep = [(difflib.SequenceMatcher(None, name, k.rsplit(".", 1)[1]).ratio(), k) for k in _all_keys(cls) if "." in k]
    best = max(deep, key=lambda rk: rk[0], default=(0.0, ""))
    return best[1] if best[0] >= 0.6 else None


TRL_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("optim.lr",),
    "per_device_train_batch_size": ("train.micro_batch_size",),
    "gradient_accumulation_steps": ("train.batch_size",),
    "num_train_epochs": ("train.epochs",),
    "max_steps": ("train.max_steps",),
    "warmup_steps": ("schedule.warmup_steps",),
    "lr_scheduler_type": ("schedule.name",),
    "weight_decay": ("optim.weight_decay",),
    "max_grad_norm": ("optim.max_grad_norm",),
    "adam_beta1": ("optim.beta1",),
    "adam_beta2": ("optim.beta2",),
    "bf16": ("train.mixed_precision",),
    "fp16": ("train.mixed_precision",),
    "gradient_checkpointing": ("model.gradient_checkpointing",),
    "model_name_or_path": ("model.path",),
    "logging_steps": ("logging.every",),
    "report_to": ("logging.trackers",),
    "save_steps": ("checkpoint.every",),
    "save_total_limit": ("checkpoint.keep_last",),
    "max_length": ("data.max_length",),
    "max_prompt_length": ("data.max_prompt_length",),
    "beta": ("beta", "kl.coef"),
    "kl_coef": ("kl.coef",),
    "num_generations": ("group_size",),
    "max_completion_length": ("rollout.max_new_tokens",),
    "response_length": ("rollout.max_new_tokens",),
    "temperature": ("rollout.temperature",),
    "num_ppo_epochs": ("ppo_epochs",),
    "num_iterations": ("ppo_epochs",),
    "cliprange": ("clip_low",),
    "epsilon": ("clip_low",),
    "epsilon_high": ("clip_high",),
    "cliprange_value": ("value_clip",),
    "loss_type": ("loss_type", "loss_aggregation"),
    "scale_rewards": ("scale_by_std",),
}
"""TRL's argument names -> ours (the first that the config has), for the "did you mean" of an unknown key.
Batches differ in kind: our train.batch_size is the global batch (TRL's per-device batch x accumulation x
processes), our train.micro_batch_size TRL's per_device_train_batch_size."""


def _unknown_key(cls: type, name: str, prefix: str, rest: str = "") -> ConfigError:
    if not prefix and not rest and name in TRL_NAMES:
        ours = next((k for k in TRL_NAMES[name] if k in _all_keys(cls) and k != name), None)
        if ours is not None:
            return ConfigError(f"unknown key {name!r} (that is TRL's name; here it is {ours!r})")
    suggestion = _suggest(cls, name)
    valid = ", ".join(field_types(cls))
    hint = f"did you mean {prefix + suggestion + rest!r}?" if suggestion else f"valid keys: {valid}"
    return ConfigError(f"unknown key {prefix + name + rest!r} ({hint})")


def _apply_mapping(obj: Any, mapping: Mapping[Any, Any], prefix: str, cli: bool) -> None:
    hints = field_types(type(obj))
    for name, value in mapping.items():
        if name not in hints:
            raise _unknown_key(type(obj), str(name), prefix)
        _assign(obj, name, value, prefix + name, cli)


def _assign(obj: Any, name: str, value: Any, key: str, cli: bool) -> None:
    tp = field_types(type(obj))[name]
    if value is _MISSING:
        if bool not in (tp, *typing.get_args(tp)):
            raise ConfigError(f"missing value (use --{key} VALUE)", key=key)
        value = True
    section = section_type(tp)
    if section is None:
        value = _coerce(value, tp, key, cli)
    elif isinstance(value, Mapping):
        current = getattr(obj, name)
        current = section() if current is None else current
        _apply_mapping(current, value, key + ".", cli)
        value = current
    elif _is_optional(tp) and (value is None or (cli and isinstance(value, str) and value.lower() in _NULLS)):
        value = None
    else:
        raise _section_error(key, section, value)
    object.__setattr__(obj, name, value)  # also works on frozen dataclasses


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """`["--optim.lr", "1e-5", "--train.batch_size=4"]` -> `[("optim.lr", "1e-5"), ("train.batch_size", "4")]`.

    A flag without a value (`--model.trust_remote_code`) sets a boolean field to true. Dashes in keys read as
    underscores (`--train.batch-size`). A value that itself starts with `--` must use the `=` form.
    """
    pairs, i = [], 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r} (overrides look like --section.key VALUE)")
        body, i = token[2:], i + 1
        if "=" in body:
            body, value = body.split("=", 1)
        elif i < len(args) and not args[i].startswith("--"):
            value, i = args[i], i + 1
        else:
            value = _MISSING
        pairs.append((body.replace("-", "_"), value))
    return pairs


def _set_dotted(cfg: Any, key: str, value: Any) -> None:
    obj, prefix, parts = cfg, "", key.split(".")
    for i, name in enumerate(parts):
        hints = field_types(type(obj))
        if name not in hints:
            rest = "".join("." + p for p in parts[i + 1 :])
            raise _unknown_key(type(obj), name, prefix, rest)
        if i == len(parts) - 1:
            _assign(obj, name, value, key, cli=True)
            return
        section = section_type(hints[name])
        if section is None:
            raise ConfigError(f"unknown key {key!r}: {prefix + name!r} is a {type_name(hints[name])}, not a section")
        if getattr(obj, name) is None:
            object.__setattr__(obj, name, section())
        obj, prefix = getattr(obj, name), prefix + name + "."


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Run `validate()` of every section that defines one, innermost first; errors get the dotted path."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = [(f.name, value)] + [(f"{f.name}[{k}]", v) for k, v in items]
        for path, child in children:
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                validate_config(child, f"{prefix}{path}.")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if not prefix:
                raise
            key = prefix + exc.key if exc.key else prefix[:-1]
            raise ConfigError(exc.message, key=key) from None


# ---------------------------------------------------------------------------------------------- files
class _StrictLoader(yaml.SafeLoader):
    """safe_load that rejects a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        if isinstance(key, typing.Hashable):
            seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: `{}`); a missing file or bad YAML is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    preset: Mapping[str, Any] | None = None,
    values: Sequence[Mapping[str, Any]] = (),
) -> T:
    """An instance of config dataclass `cls`: defaults, then `preset`, the YAML file, `values` (nested mappings,
    as from Python), the command-line overrides; validated once, at the end."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    cfg = cls()
    if preset:
        _apply_mapping(cfg, preset, "", cli=False)
    if path is not None:
        data = read_yaml(path)
        try:
            _apply_mapping(cfg, data, "", cli=False)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for mapping in values:
        _apply_mapping(cfg, mapping, "", cli=False)
    for key, value in parse_overrides(overrides):
        _set_dotted(cfg, key, value)
    validate_config(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts, lists and scalars (what `save_config` writes)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, Path) else value

    return plain(dataclasses.asdict(cfg))


def config_yaml(data: dict[str, Any]) -> str:
    """YAML text of a config dict, in field order. Non-ASCII characters are written escaped: raw, some
    (NEL, LINE SEPARATOR) would be read back as line breaks, and the value would not round-trip."""
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (the run directory's `config.yaml`); `load_config` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(to_dict(cfg)), encoding="utf-8")
    return path
