"""Config dataclasses -> argparse, with YAML defaults.

Boundary: this module knows nothing about models or tokenizers. Each command owns one
dataclass; its field defaults are the only defaults anywhere, its field ``help`` metadata
becomes ``--help``, and ``--config run.yaml`` supplies values that explicit flags override.

Field metadata keys:
- ``help``: the option's help text (required; the default is appended automatically).
- ``positional``: the field is a positional argument (optional when it has a default).
- ``choices``: a sequence, or a zero-argument callable returning one (e.g. a registry).
- ``short``: an extra short flag such as ``-k``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tokensurgeon.errors import UsageError

C = TypeVar("C")


def _field_type(cls: type, field: dataclasses.Field) -> tuple[type, bool]:
    """Return (scalar type, is_list) for a dataclass field, unwrapping Optional."""
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of ``cls`` plus ``--config``. Defaults stay in ``cls``."""
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} needs help metadata")
        tp, is_list = _field_type(cls, field)
        default = _default_of(field)
        help_text = meta["help"]
        if default is not dataclasses.MISSING and default is not None and default != []:
            help_text += f" (default: {default})"
        choices = meta.get("choices")
        if callable(choices):
            choices = sorted(choices())
        if choices is not None and tp is not bool:
            help_text += f" [choices: {', '.join(map(str, choices))}]"
        kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if choices is not None:
            kwargs["choices"] = choices
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = field.name.upper()
            if is_list:
                kwargs["action"] = "append"
        if meta.get("positional"):
            kwargs.pop("metavar", None)
            if default is not dataclasses.MISSING:
                kwargs["nargs"] = "?"
            parser.add_argument(field.name, **kwargs)
        else:
            flags = ["--" + field.name.replace("_", "-")]
            if "short" in meta:
                flags.append(meta["short"])
            parser.add_argument(*flags, dest=field.name, **kwargs)
    parser.add_argument(
        "--config",
        dest="_config_file",
        default=None,
        metavar="YAML",
        help="YAML file of option values; explicit flags override it",
    )


def _load_yaml(path: str, cls: type) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path} is not valid YAML ({exc.__class__.__name__})")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted({k.replace("-", "_") for k in data} - names)
    if unknown:
        raise UsageError(f"config file {path} has unknown options {unknown}; known: {sorted(names)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve_config(cls: type[C], namespace: argparse.Namespace) -> C:
    """Merge dataclass defaults <- YAML file <- explicit flags into an instance of ``cls``."""
    values: dict[str, Any] = {}
    config_file = getattr(namespace, "_config_file", None)
    if config_file:
        values.update(_load_yaml(config_file, cls))
    for field in dataclasses.fields(cls):
        if hasattr(namespace, field.name):
            values[field.name] = getattr(namespace, field.name)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and _default_of(f) is dataclasses.MISSING
    ]
    if missing:
        raise UsageError(f"missing required option(s): {', '.join(missing)}")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-data view of a config, for manifests and resolved-config files."""
    return dataclasses.asdict(config)


def write_resolved_config(directory: str | Path, config: Any) -> Path:
    """Write every resolved option of ``config`` to ``directory/config.yaml``; the file
    loads back with ``--config`` and reproduces the run."""
    path = Path(directory) / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path
