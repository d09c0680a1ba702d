"""Configs are dataclasses with defaults; a YAML file overrides them; `key=value` overrides that.

    cfg = load_config(PipelineConfig, "configs/pipeline.yaml", ["ppo.kl_coef=0.1", "sft.lr=1e-3"])

- Nested dataclasses are addressed with dotted keys (`ppo.kl_coef`) on the command line and with
  nested mappings in YAML (`ppo: {kl_coef: 0.1}`). A nested config keeps the values its parent's
  default gave it (e.g. a pipeline's `sft.output_dir`) unless they are overridden.
- Values are coerced to the field's annotated type: bool, int, float, str, Path, Literal,
  Enum, X | None, list[X], tuple[X, ...], dict[K, V], nested dataclasses. On the command line,
  `null`/`none` sets an optional field to None (an empty value, `model=`, is refused: an unset
  shell variable gives it); lists are written `[1, 2]` or `1,2` (one
  value alone is a list of one).
  YAML's `1e-4` (a string to YAML 1.1) becomes the float 1e-4 for a float field. An int field
  takes a whole number of at most 2**53 in size (`1e3` is 1000; `2.5`, `nan`, `1e30` are
  refused naming the key), where every whole number is exact as a float.
- An unknown key is an error that lists the valid keys (and the closest match). The dataclass's
  own `__post_init__` checks run on the final values.
- Defaults that depend on the given values: a dataclass with a classmethod
  `config_defaults(values)` is built from the instance it returns instead of `cls()` (the values
  are the raw YAML + override tree; `is_set(values, "sft.model")` reads it). The trainer uses it
  to start from the built-in task's settings when no model is given (rlhf/task.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import os
import re
import types
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["config_to_dict", "given_keys", "given_values", "is_set", "load_config",
           "named_as_typed", "nested_error", "parse_overrides", "save_config", "value_of",
           "warnings_named"]

T = TypeVar("T")
_NULL_WORDS = {"null", "none", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}
# the largest integer setting taken: every whole number up to it is exact as a float (1e15 is
# 10**15), and none of the trainer's counts, sizes or seeds comes near it
INT_LIMIT = 2**53


class _CommandLineValue(str):
    """A value typed on the command line: parsed by YAML rules unless the field is a string."""


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """["a.b=1", "c=x"] -> {"a": {"b": "1"}, "c": "x"} (values stay unparsed strings)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like key=value (nested keys with dots, "
                             f"e.g. ppo.kl_coef=0.1)")
        *parents, leaf = key.split(".")
        node = tree
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parents[:depth + 1])!r} was "
                                 f"already set to a value, it cannot also hold nested keys")
            node = child
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"override {item!r}: {key!r} already has nested overrides")
        if leaf in node and node[leaf] != value:
            # the last one wins (what --resume's refusal relies on: "add `key=value` to the
            # command"), but a long command that sets a key twice is most often a slip
            warnings.warn(f"{key} is given twice on the command line ({key}={node[leaf]}, then "
                          f"{key}={value}); the last one, {key}={value}, is used", stacklevel=2)
        node[leaf] = _CommandLineValue(value)
    return tree


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: str | Path) -> dict[str, Any]:
    # `~/configs/x.yaml` quoted (or from a script) is in the home directory, as for model=,
    # dataset= and output_dir=, not a folder named ~ here ("does not exist")
    path = Path(path).expanduser()
    if path.is_dir():  # was "does not exist", which it does
        raise ValueError(f"config file {str(path)!r} is a directory; give the YAML file (e.g. "
                         f"configs/sft.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with path.open(encoding="utf-8") as handle:
            from rlhf.strict_yaml import UniqueKeySafeLoader  # a key given twice is an error

            loaded = yaml.load(handle, Loader=UniqueKeySafeLoader)  # a yaml.SafeLoader
    except UnicodeDecodeError as error:  # said only "'utf-8' codec can't decode byte 0xff ..."
        bad = error.object[error.start:error.start + 1]
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (it holds the byte "
                         f"{bad!r}); give a YAML file (each line `key: value`), saved as "
                         f"UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; fix "
                         f"the file (each line `key: value`, nested keys indented)") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values at the "
                         f"top level, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], yaml_path: str | Path | None = None,
                overrides: Sequence[str] = ()) -> T:
    """An instance of dataclass `cls`: defaults, then the YAML file, then `key=value` overrides."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    values = given_values(yaml_path, overrides)
    defaults = getattr(cls, "config_defaults", None)
    base = defaults(values) if callable(defaults) else _default_instance(cls)
    return _build(cls, values, prefix="", base=base)


def given_values(yaml_path: str | Path | None = None,
                 overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw tree of what the user gave: the YAML file's mapping with the `key=value`
    overrides merged over it (values unparsed; read one with ``value_of`` or ``is_set``)."""
    values = _read_yaml(yaml_path) if yaml_path is not None else {}
    return _merge(values, parse_overrides(overrides))


def given_keys(values: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted keys of the leaves of a raw config tree (``given_values``): every setting the
    user gave, e.g. ``ppo.bf16`` for ``ppo: {bf16: true}`` or ``ppo.bf16=true``."""
    for key, value in values.items():
        if isinstance(value, Mapping):
            yield from given_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def is_set(values: Mapping[str, Any], key: str) -> bool:
    """Whether the raw config tree `values` (YAML + overrides, before building) gives the dotted
    `key` a value other than null."""
    node: Any = values
    for part in key.split("."):
        if isinstance(node, _CommandLineValue):  # e.g. sft="{model: x}" on the command line
            node = _parse_command_line(node, part)
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    if isinstance(node, _CommandLineValue):
        return node.strip().lower() not in _NULL_WORDS
    return node is not None


def value_of(values: Mapping[str, Any], key: str, field_type: Any) -> Any:
    """The dotted ``key``'s value in the raw config tree ``values`` (YAML + overrides, before
    building), coerced to ``field_type`` as the field will be; None when it is not set."""
    node: Any = values
    for part in key.split("."):
        if isinstance(node, _CommandLineValue):
            node = _parse_command_line(node, part)
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return _coerce(node, field_type, key)


def _default_instance(cls: type) -> Any | None:
    """cls() when every field has a default, else None (then the values must supply them)."""
    try:
        return cls()
    except TypeError:
        return None


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build(cls: type, values: Mapping[str, Any], prefix: str, base: Any | None) -> Any:
    fields = _init_fields(cls)
    hints = typing.get_type_hints(cls)  # resolves `from __future__ import annotations` strings
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name not in fields:
            _unknown_key(cls, prefix, name, fields)
        field_type = hints.get(name, Any)
        nested_cls = _dataclass_in(field_type)
        if (nested_cls is not None and isinstance(raw, _CommandLineValue)
                and raw.strip().lower() not in _NULL_WORDS):
            raw = _parse_command_line(raw, prefix + name)  # e.g. sft="{lr: 0.1}"
        if nested_cls is not None and isinstance(raw, Mapping):
            current = getattr(base, name, None) if base is not None else None
            if not dataclasses.is_dataclass(current):
                current = _default_instance(nested_cls)
            kwargs[name] = _build(nested_cls, raw, prefix + name + ".", current)
        else:
            kwargs[name] = _coerce(raw, field_type, prefix + name)
    if base is None:
        missing = [name for name, f in fields.items() if name not in kwargs and f.default is
                   dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            where = f" (in {prefix.rstrip('.')})" if prefix else ""
            raise ValueError(f"{cls.__name__} needs values for {missing}{where}; set them in the "
                             f"YAML file or as key=value")
    try:
        with warnings_named(prefix, cls) if prefix else contextlib.nullcontext():
            return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as error:
        if not prefix:
            raise
        raise nested_error(error, cls, prefix) from None


def nested_error(error: ValueError, cls: type, prefix: str) -> ValueError:
    """A nested config's own check (its ``__post_init__``) says ``batch_size must be >= 1``:
    as the user wrote the key, ``reward.batch_size must be >= 1`` (``reward.`` is ``prefix``),
    so that it is clear which of the nested configs holding that field is meant (also for a
    check that a value the pipeline sets in a stage trips: its device, its seed)."""
    message = named_as_typed(str(error), prefix, cls)
    if message is None:
        message = f"{prefix.rstrip('.')}: {error}"
    try:
        return type(error)(message)
    except TypeError:  # an error type with other constructor arguments
        return ValueError(message)


def named_as_typed(message: str, prefix: str, cls: type) -> str | None:
    """``message`` about a setting of the nested config ``cls`` (``"warmup_steps=10 is ..."``,
    ``"RewardConfig.lr must be ..."``) with the setting named as the user types it under
    ``prefix`` (``"reward.warmup_steps=10 is ..."``, ``"reward.lr must be ..."``); None when the
    message does not start with one of ``cls``'s settings."""
    leading = re.match(r"[A-Za-z_][A-Za-z0-9_]*", message)
    follows = message[leading.end():][:1] if leading else ""
    if not (leading and leading.group(0) in _init_fields(cls)
            and follows in ("=", " ", ":", ".")):
        return None
    message = prefix + message
    # the settings the message tells the user to type ("add loss_normalizer=batch"), as typed
    fields = _init_fields(cls)
    message = re.sub(r"\b(add|set|use|pass|give|lower|raise) ([A-Za-z_][A-Za-z0-9_]*)=",
                     lambda m: (f"{m.group(1)} {prefix}{m.group(2)}=" if m.group(2) in fields
                                else m.group(0)), message)
    return re.sub(rf"\b{re.escape(cls.__name__)}\.(?=[A-Za-z_])", prefix, message)


@contextlib.contextmanager
def warnings_named(prefix: str, cls: type) -> Iterator[None]:
    """Within the block, a warning of this trainer about one of ``cls``'s settings names it as
    typed under ``prefix``: a stage of ``rlhf pipeline`` warns "warmup_steps=10 is more than the
    run's 2 optimizer steps", and sft, reward and ppo each have a warmup_steps."""
    show = warnings.showwarning
    ours = str(Path(__file__).resolve().parent) + os.sep

    def shown(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(ours):
            renamed = named_as_typed(str(message), prefix, cls)
            if renamed is not None:
                message = renamed
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = shown
    try:
        yield
    finally:
        warnings.showwarning = show


# A key one stage takes and another, where it would be typed, has no such setting for.
_KEY_HINTS = {
    ("RewardConfig", "max_steps"): "The reward stage counts epochs, not steps: epochs=0.1 trains "
                                   "on a tenth of the pairs",
}
# Settings of TRL's trainer configs (and veRL's, OpenRLHF's) by the name each has here: a user
# coming from them types theirs. (candidates: the first that the config has; what to know.)
_FRAMEWORK_NAMES = {
    "learning_rate": (("lr",), ""),
    "num_generations": (("group_size",), "the samples per prompt"),
    "beta": (("kl_coef",), "the KL penalty's weight"),
    "init_kl_coef": (("kl_coef",), "the KL penalty's weight"),
    "kl_coef_target": (("kl_target",), ""),
    "epsilon": (("clip_ratio",), "the ratio's clip range"),
    "cliprange": (("clip_ratio",), "the ratio's clip range"),
    "epsilon_high": (("clip_ratio_high",), "the upper clip of the ratio (DAPO's clip-higher)"),
    "cliprange_value": (("value_clip",), ""),
    "scale_rewards": (("advantage_norm",), "group | batch | none; TRL's false is none"),
    "importance_sampling_level": (("ratio_level",), "token | sequence"),
    "loss_agg_mode": (("loss_reduction",), "token-mean | seq-mean-token-mean | ..."),
    "max_completion_length": (("max_new_tokens",), ""),
    "response_length": (("max_new_tokens",), ""),
    "per_device_train_batch_size": (("batch_size", "minibatch_size"), ""),
    "gradient_accumulation_steps": (("grad_accum_steps",), ""),
    "num_train_epochs": (("epochs",), "passes over the data"),
    "num_ppo_epochs": (("ppo_epochs",), "passes over each rollout"),
    "ppo_epochs_per_batch": (("ppo_epochs",), "passes over each rollout"),
    "max_grad_norm": (("grad_clip",), ""),
    "max_seq_length": (("max_length",), ""),
    "warmup_ratio": (("warmup_steps",), "a number of steps here, not a fraction"),
}


def _framework_name(name: str, cls: type, prefix: str) -> str | None:
    """The hint for a key that is another framework's name of a setting of ``cls`` (or of one
    of its nested configs: the pipeline's stages), else None."""
    candidates, note = _FRAMEWORK_NAMES.get(name, ((), ""))
    fields = _init_fields(cls)
    hints = typing.get_type_hints(cls)
    targets = [field for field in candidates if field in fields][:1] or [
        f"{outer}.{field}" for outer in sorted(fields)
        if (inner := _dataclass_in(hints.get(outer, Any))) is not None
        for field in candidates[:1] if field in _init_fields(inner)]
    if not targets:
        return None
    shown = " or ".join(repr(prefix + target) for target in targets)
    hint = f" {name!r} is TRL's (or veRL's) name: here the setting is {shown}"
    hint += f": {note}." if note else "."
    if candidates[0] == "ppo_epochs":
        hint += (" (TRL's GRPOConfig.num_iterations is ppo_epochs too; num_iterations here "
                 "counts the run's iterations.)")
    return hint


# The stage commands by config class (the module and class each command runs).
_STAGE_CONFIGS = (("sft", "rlhf.sft", "SFTConfig"), ("rm", "rlhf.reward", "RewardConfig"),
                  ("ppo", "rlhf.rl", "PPOConfig"), ("pipeline", "rlhf.pipeline",
                                                   "PipelineConfig"))


def _commands_with(name: str, cls: type) -> list[str]:
    """The stage commands whose config has a setting ``name`` (other than ``cls``'s)."""
    import importlib

    found = []
    for command, module, class_name in _STAGE_CONFIGS:
        try:
            other = getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):  # a stage whose extras are not installed
            continue
        if other is not cls and not issubclass(cls, other) and name in _init_fields(other):
            found.append("ppo / grpo" if command == "ppo" else command)
    return found


def _unknown_key(cls: type, prefix: str, name: str, fields: Mapping[str, Any]) -> typing.NoReturn:
    valid = sorted(fields)
    # a setting of a nested config given at the top (`rlhf pipeline kl_coef=0.05`): its
    # dotted names, e.g. 'ppo.kl_coef' (or 'sft.lr', 'reward.lr', 'ppo.lr')
    hints = typing.get_type_hints(cls)
    nested = [f"{prefix}{field}.{name}" for field in valid
              if (inner := _dataclass_in(hints.get(field, Any))) is not None
              and name in _init_fields(inner)]
    close = difflib.get_close_matches(name, valid, n=1)
    if (cls.__name__, name) in _KEY_HINTS:
        hint = f" {_KEY_HINTS[cls.__name__, name]}."
    elif (framework := _framework_name(name, cls, prefix)) is not None:
        hint = framework
    elif nested:
        hint = f" Did you mean {' or '.join(repr(key) for key in nested)}?"
    elif (other := _commands_with(name, cls)):
        hint = (f" {name!r} is a setting of `rlhf {' / '.join(other)}`: is this the config of "
                f"another command?")
    else:
        hint = f" Did you mean {prefix + close[0]!r}?" if close else ""
    raise ValueError(f"unknown config key {prefix + name!r} for {cls.__name__}.{hint} Valid keys"
                     f"{' under ' + repr(prefix.rstrip('.')) if prefix else ''}: "
                     f"{', '.join(valid)}")


def _dataclass_in(field_type: Any) -> type | None:
    """The dataclass type of a field annotated `C` or `C | None`, else None."""
    if isinstance(field_type, type) and dataclasses.is_dataclass(field_type):
        return field_type
    if _is_union(field_type):
        for arg in typing.get_args(field_type):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    return None


def _is_union(field_type: Any) -> bool:
    return typing.get_origin(field_type) in (typing.Union, types.UnionType)


def _parse_command_line(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"cannot parse the value {raw!r} of {key!r}: {error}") from None


def _type_name(field_type: Any) -> str:
    return getattr(field_type, "__name__", None) or str(field_type).replace("typing.", "")


def _expected(field_type: Any) -> str:
    """What a value of ``field_type`` is, in the user's words: ``int | None`` -> "an integer or
    null"."""
    if _is_union(field_type):
        args = typing.get_args(field_type)
        words = [_expected(arg) for arg in args if arg is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    origin = typing.get_origin(field_type)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(field_type))}"
    if isinstance(field_type, type) and issubclass(field_type, enum.Enum):
        return f"one of {[member.name for member in field_type]}"
    if isinstance(field_type, type) and issubclass(field_type, Path):
        return "a path"
    named = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}
    if field_type in named or origin in named:
        return named.get(field_type) or named[origin]
    if origin in (Sequence, typing.Sequence):
        return "a list"
    if origin in (Mapping, typing.Mapping) or dataclasses.is_dataclass(field_type):
        return "a mapping"
    return _type_name(field_type)


def _coerce(value: Any, field_type: Any, key: str) -> Any:
    """`value` converted to `field_type`, or a ValueError naming the key, value and type."""
    if field_type is Any or field_type is object:
        return _parse_command_line(value, key) if isinstance(value, _CommandLineValue) else value
    origin, args = typing.get_origin(field_type), typing.get_args(field_type)

    if _is_union(field_type):
        if type(None) in args and isinstance(value, _CommandLineValue) and not value.strip():
            # `model=$MODEL` with MODEL unset: read as null, it trained the built-in tiny model
            # from scratch (dataset=: the built-in corpus) without a word
            raise ValueError(f"config key {key!r} is given empty ({key}=), which would mean "
                             f"null, its default; an unset shell variable ({key}=$VAR) does "
                             f"this. Give a value, or write {key}=null for the default")
        if type(None) in args and (value is None or (isinstance(value, _CommandLineValue)
                                                    and value.strip().lower() in _NULL_WORDS)):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(f"config key {key!r} must be {_expected(field_type)}, got {value!r}")

    if origin is typing.Literal:
        for choice in args:
            try:
                candidate = _coerce(value, type(choice), key)
            except ValueError:
                continue
            if candidate == choice:
                return choice
        raise ValueError(f"config key {key!r} must be one of {list(args)}, got {value!r}")

    if field_type is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `name: 2024` as an int
        raise ValueError(f"config key {key!r} must be a string, got {value!r}")
    if field_type is Path or (isinstance(field_type, type) and issubclass(field_type, Path)):
        return Path(_coerce(value, str, key))

    # Everything below reads a command-line string by YAML rules first: 3 -> int, [1, 2] -> list.
    if isinstance(value, _CommandLineValue):
        value = _parse_command_line(value, key)

    if field_type is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise ValueError(f"config key {key!r} must be true or false, got {value!r}")
    if field_type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            number = _as_float(value)
            if number is None or not number.is_integer():  # 2.5, nan, inf, "ten"
                raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        if abs(number) > INT_LIMIT:
            # 1e30 is an integer to float(): it went on to the settings' checks as
            # 1000000000000000019884624838656 and was said as another setting's error
            # (rollout_batch_size=1e30: "kl_horizon=500 is too short")
            raise ValueError(f"config key {key!r} must be an integer of at most 2**53 "
                             f"(9007199254740992) in size, got {value!r}; no setting of this "
                             f"trainer needs more")
        return int(number)
    if field_type is float:
        number = _as_float(value)
        if number is None:
            raise ValueError(f"config key {key!r} must be a number, got {value!r}")
        return number
    if isinstance(field_type, type) and issubclass(field_type, enum.Enum):
        for member in field_type:
            if value == member.value or value == member.name:
                return member
        raise ValueError(f"config key {key!r} must be one of "
                         f"{[member.name for member in field_type]}, got {value!r}")

    if origin in (list, tuple, Sequence, typing.Sequence) or field_type in (list, tuple):
        if isinstance(value, str):  # "a,b" on the command line or in YAML
            value = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (int, float)):  # one number, as one name is ("kl_coefs=0.1")
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"config key {key!r} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or field_type is tuple) else items
    if origin in (dict, Mapping, typing.Mapping) or field_type is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return {_coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(field_type):
        raise ValueError(f"config key {key!r} is a nested config; give a mapping or set its "
                         f"fields as {key}.<name>=value, got {value!r}")
    if isinstance(field_type, type) and isinstance(value, field_type):
        return value
    raise ValueError(f"config key {key!r}: cannot convert {value!r} to {_type_name(field_type)}")


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-writable dict of a (nested) config dataclass."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(type(cfg), path)` reads it."""
    from rlhf.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
