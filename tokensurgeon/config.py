"""Config dataclasses -> argparse, with YAML defaults.

Boundary: this module knows nothing about models or tokenizers. Each command owns one
dataclass; its field defaults are the only defaults anywhere, its field ``help`` metadata
becomes ``--help``, and ``--config run.yaml`` supplies values that explicit flags override.

Field metadata keys:
- ``help``: the option's help text (required; the default is appended automatically).
- ``positional``: the field is a positional argument (optional when it has a default).
- ``choices``: a sequence, or a zero-argument callable returning one (e.g. a registry's
  ``names``), so ``--help`` lists what is registered and never needs editing.
- ``names``: a zero-argument callable (a registry's ``names``) listed in ``--help`` for an
  option whose value is built from those names (``--loss alm+sft``).
- ``short``: an extra short flag such as ``-k``.
- ``comma``: a list field given on the command line as one comma list (``--gamma 2,3,4``)
  rather than by repeating the flag.

Registry members own their options: :func:`member_options` gives a command's dataclass the
fields of every registered member's options dataclass (``member.options``), so a method's
``--k`` is declared once, in the method's module, and reads like any other option.

YAML values go through the same conversion and checks as flags: an ``int`` option must be a
YAML integer (``steps: '300'`` is refused), a list option takes one value or a list
(``data: x.txt`` becomes ``[x.txt]``), a comma option also takes ``"2,3,4"``, and
``choices`` apply. ``1e-4`` reads as a float (YAML 1.2), not as the string PyYAML's YAML 1.1
makes of it.
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


def member_options(registry: dict[str, Any], after: str) -> Any:
    """Class decorator: the config dataclass gains the fields of each member's options
    dataclass (``registry[name].options``, when given), listed in ``--help`` right after
    its field ``after``.

    Each field keeps its default and metadata, so it becomes a flag, a YAML key and an
    attribute of the config like any field declared there (a keyword-only argument). The
    result is a dataclass subclass of the decorated class, under its name. Members may share
    an option (same name, type and default); a member option that clashes with the
    config's own fields, or with another member's differing one, is a TypeError at import.
    Applying the decorator again adds only members registered since (e.g. in a test).
    """
    def wrap(cls: type) -> type:
        hints = typing.get_type_hints(cls)
        before: dict[str, tuple] = getattr(cls, "__member_options__", {})
        contributed = dict(before)
        added: list[tuple[str, Any, dataclasses.Field]] = []
        for name in sorted(registry):
            options = getattr(registry[name], "options", None)
            if options is None:
                continue
            option_hints = typing.get_type_hints(options)
            for f in dataclasses.fields(options):
                spec = (option_hints[f.name], _default_of(f))
                if f.name in contributed:
                    if contributed[f.name] != spec:
                        raise TypeError(f"{cls.__name__}: option {f.name!r} of {name!r} differs "
                                        "from another member's option of that name")
                    continue
                if f.name in hints:
                    raise TypeError(f"{cls.__name__}: option {f.name!r} of {name!r} clashes "
                                    f"with the config's own field; rename it")
                if spec[1] is dataclasses.MISSING:
                    raise TypeError(f"{name!r} option {f.name!r} needs a default")
                contributed[f.name] = spec
                added.append((f.name, option_hints[f.name], dataclasses.field(
                    default=f.default, default_factory=f.default_factory,
                    metadata=f.metadata, kw_only=True)))
        new = dataclasses.make_dataclass(cls.__name__, added, bases=(cls,), namespace={
            "__doc__": cls.__doc__, "__qualname__": cls.__qualname__})
        new.__module__ = cls.__module__
        new.__member_options__ = contributed
        order = [f.name for f in _cli_fields(cls)]
        at = max(i for i, n in enumerate(order) if n == after or n in before) + 1
        new.__cli_order__ = order[:at] + [n for n, _, _ in added] + order[at:]
        return new

    return wrap


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    """``cls``'s fields in ``--help`` order: those it inherits from a base dataclass (shared
    options such as :class:`tokensurgeon.training.TrainingOptions`) after its own, members'
    options (:func:`member_options`) where it placed them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "__cli_order__" in vars(cls):
        return [fields[n] for n in cls.__cli_order__]
    shared = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
              for f in dataclasses.fields(base)}
    return ([f for f in fields.values() if f.name not in shared]
            + [f for f in fields.values() if f.name in shared])


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of ``cls`` plus ``--config``. Defaults stay in ``cls``."""
    for field in _cli_fields(cls):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} needs help metadata")
        tp, is_list = _field_type(cls, field)
        default = _default_of(field)
        help_text = meta["help"]
        if default is not dataclasses.MISSING and default is not None and default != []:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        if "names" in meta:  # a registry whose names the value is built from (e.g. alm+sft)
            help_text += f" [names: {', '.join(sorted(meta['names']()))}]"
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
            if is_list and meta.get("comma"):
                kwargs["type"] = _comma_list(tp, "--" + field.name.replace("_", "-"))
                kwargs.pop("choices", None)  # checked per element in resolve_config
            elif is_list:
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


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float, as YAML 1.2 and every user expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", __import__("re").X),
    list("-+0123456789."))


def _comma_list(tp: type, flag: str):
    """argparse ``type=`` for a comma option: ``"2,3,4"`` -> ``[2, 3, 4]``."""
    def parse(text: str) -> list:
        parts = [x for x in text.replace(" ", "").split(",") if x]
        if not parts:
            raise argparse.ArgumentTypeError(f"{flag} is empty; give at least one value")
        try:
            return [tp(x) for x in parts]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma list of {tp.__name__} values, e.g. 2,3,4") from None
    parse.__name__ = f"comma list of {tp.__name__}"
    return parse


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce_scalar(value: Any, tp: type, where: str) -> Any:
    """One YAML value as the field's type, with the checks a flag's ``type=`` would make."""
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
    )
    if not ok:
        shown = f"{value!r}" if not isinstance(value, str) else f"'{value}'"
        hint = ""
        if isinstance(value, str) and tp in (int, float):
            hint = f"; write it without quotes: {where.split(': ')[-1]}: {value}"
        raise UsageError(f"{where} is {shown} ({type(value).__name__}), but the option takes "
                         f"{_KIND.get(tp, tp.__name__)}{hint}")
    return tp(value)


def _coerce(cls: type, name: str, value: Any, path: str) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    tp, is_list = _field_type(cls, field)
    where = f"config file {path}: {name}"
    if value is None:
        if _default_of(field) is None:
            return None
        raise UsageError(f"{where} is empty; give a value or delete the line")
    if is_list:
        if isinstance(value, str) and field.metadata.get("comma"):
            try:  # "2,3,4" reads as the flag would read it
                value = _comma_list(tp, name)(value)
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"{where}: {exc}") from None
        items = value if isinstance(value, list) else [value]
        out = [_coerce_scalar(v, tp, where) for v in items]
    else:
        if isinstance(value, (list, dict)):
            raise UsageError(f"{where} is a {type(value).__name__}, but the option takes one "
                             f"value ({_KIND.get(tp, tp.__name__)})")
        out = _coerce_scalar(value, tp, where)
    _check_choices(cls, field, out if is_list else [out], where)
    return out


def _check_choices(cls: type, field: dataclasses.Field, values: list, where: str) -> None:
    choices = field.metadata.get("choices")
    if choices is None:
        return
    allowed = list(choices() if callable(choices) else choices)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise UsageError(f"{where}: {bad[0]!r} is not one of {', '.join(map(str, sorted(allowed)))}")


def _load_yaml(path: str, cls: type) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {path} does not exist; pass an existing YAML file")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not UTF-8 text (byte offset {exc.start}); "
                         "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise UsageError(f"config file {path} is not valid YAML{at} ({problem}); fix that line"
                         ) from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted({str(k).replace("-", "_") for k in data} - names)
    if unknown:
        raise UsageError(f"config file {path} has unknown options {unknown}; known: {sorted(names)}")
    return {str(k).replace("-", "_"): _coerce(cls, str(k).replace("-", "_"), v, path)
            for k, v in data.items()}


def resolve_config(cls: type[C], namespace: argparse.Namespace) -> C:
    """Merge dataclass defaults <- YAML file <- explicit flags into an instance of ``cls``."""
    values: dict[str, Any] = {}
    config_file = getattr(namespace, "_config_file", None)
    if config_file:
        values.update(_load_yaml(config_file, cls))
    for field in dataclasses.fields(cls):
        if hasattr(namespace, field.name):
            values[field.name] = getattr(namespace, field.name)
            if field.metadata.get("comma"):
                _check_choices(cls, field, values[field.name],
                               "--" + field.name.replace("_", "-"))
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


def read_resolved_config(directory: str | Path) -> dict:
    """The options :func:`write_resolved_config` saved in ``directory/config.yaml`` ({} when
    there is none or it is not a mapping)."""
    path = Path(directory) / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return saved if isinstance(saved, dict) else {}


def check_resume_options(out: Path, config: Any, free: set[str]) -> None:
    """Refuse a ``--resume`` whose options differ from those saved in ``out/config.yaml``
    (except the ``free`` ones, which do not change the result). An option the saved file
    lacks (added since that run) counts as its default, which keeps the earlier behaviour."""
    saved = read_resolved_config(out)
    now = config_to_dict(config)
    default = {f.name: _default_of(f) for f in dataclasses.fields(config)}
    changed = sorted(k for k in now
                     if k not in free and saved.get(k, default.get(k)) != now[k])
    if changed:
        raise UsageError(f"--resume with options that differ from the checkpointed run "
                         f"({', '.join(changed)}); pass the original options")
