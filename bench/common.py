"""What every bench script shares: the repository root on ``sys.path``, one data root, the
library's config options as flags, and the CLI's one-line errors.

Boundary: no model code. A bench builds the same config dataclasses the CLI uses; the flags
it takes from them (``add_config_options``) keep the dataclass's defaults, so no default is
stated twice. Flags a bench needs beyond the configs are declared here once
(``add_data_root``, ``SPEC_PROMPT_OPTIONS``) and shared between scripts.

Data root: ``--data-root DIR``, else ``$TOKENSURGEON_DATA``, else the repository's ``data/``
(vendored, with its licences: data/README.md). A bench checks every file it will read and
every input it needs with ``require`` before it writes anything (out/, bench/runs/,
bench/results/, the model cache), and ``run`` turns a ``UsageError`` into one line and exit
code 2, as the CLI does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# First on the path, before bench/ itself: bench/distill.py must not shadow the distill package.
sys.path.insert(0, str(ROOT))

from tokensurgeon.config import add_config_arguments
from tokensurgeon.errors import UsageError

DATA_ENV = "TOKENSURGEON_DATA"
VENDORED_DATA = ROOT / "data"

# The files the benches read, relative to the data root (data/README.md describes them).
GSM8K_TRAIN = "gsm8k/train.jsonl"
GSM8K_TEST = "gsm8k/test.jsonl"
PROSE = "wikitext2-valid-prose.txt"
WIKITEXT_RAW = "wikitext2-valid.txt"
SHAKESPEARE = "tinyshakespeare.txt"

# Transplant v1's OMP settings (the default before issue 8), as `tokensurgeon transplant`
# option values. Benches compare against this named preset; the defaults live in the library.
OMP_V1 = {"centre": False, "search": "exact", "k": 64, "candidates": 256, "refreshes": 10,
          "coefficients": "lstsq", "shrink": 1.0, "output_shrink": "1", "untie": False}

# SpecBenchConfig fields every speculative-decoding bench takes as flags, with that config's
# defaults (--gamma, --temperature, ...): bench/spec.py, bench/spec_crosstok.py and any new
# spec bench add them with add_config_options(parser, SpecBenchConfig, SPEC_PROMPT_OPTIONS).
SPEC_PROMPT_OPTIONS = ("gamma", "temperature", "num_prompts", "prompt_offset", "max_tokens",
                       "seed")


def add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-root", default=None, metavar="DIR",
        help=f"folder holding the benches' texts (default: ${DATA_ENV}, else the "
             "repository's data/)")


def data_root(args: argparse.Namespace) -> Path:
    """The data root named by ``--data-root``, ``$TOKENSURGEON_DATA`` or the vendored data/."""
    given = getattr(args, "data_root", None) or os.environ.get(DATA_ENV)
    return Path(given).expanduser() if given else VENDORED_DATA


def require(args: argparse.Namespace, names: Iterable[str]) -> Path:
    """Check that every named data file exists under the data root; return the root. One
    line naming the file and the fix otherwise."""
    root = data_root(args)
    for name in names:
        if not (root / name).is_file():
            where = ("--data-root" if getattr(args, "data_root", None)
                     else f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the repository's data/")
            raise UsageError(f"data file {name} not found under {root} (from {where}); pass "
                             f"--data-root DIR or set {DATA_ENV} to a folder laid out like "
                             "data/ (see data/README.md), or restore data/ with git checkout")
    return root


def require_paths(paths: Iterable[tuple[str, str | Path]]) -> None:
    """Check that inputs the bench reads exist: (flag, path) pairs, one line otherwise."""
    for flag, path in paths:
        if not Path(path).exists():
            raise UsageError(f"{flag}: {path} does not exist; make it first or pass another")


def _subset(cls: type, names: Iterable[str]) -> type:
    hints = typing.get_type_hints(cls)
    wanted = set(names)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name not in wanted:
            continue
        kw: dict[str, Any] = {"metadata": {k: v for k, v in f.metadata.items()
                                           if k != "positional"}}
        if f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            kw["default_factory"] = f.default_factory
        fields.append((f.name, hints[f.name], dataclasses.field(**kw)))
    missing = wanted - {f[0] for f in fields}
    if missing:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(missing)}")
    return dataclasses.make_dataclass(cls.__name__, fields)


def add_config_options(parser: argparse.ArgumentParser, cls: type, names: Iterable[str]) -> None:
    """Add the named fields of config dataclass ``cls`` as flags, with the CLI's types, help
    and choices; a flag not given stays absent, so ``config_values`` takes ``cls``'s default."""
    scratch = argparse.ArgumentParser(add_help=False)
    add_config_arguments(scratch, _subset(cls, names))
    for action in scratch._actions:
        if action.dest != "_config_file":
            parser._add_action(action)


def config_values(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The named fields' values: the flag when given, else ``cls``'s own default."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in set(names):
            if hasattr(args, f.name):
                out[f.name] = getattr(args, f.name)
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def resolve_options(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """Set every named field on ``args`` (the flag when given, else ``cls``'s default) and
    return them; ``cls(**fixed, **resolve_options(...))`` then builds the bench's config."""
    values = config_values(args, cls, names)
    vars(args).update(values)
    return values


def cli_flags(options: dict[str, Any]) -> list[str]:
    """``tokensurgeon`` command-line flags for option values (booleans as --x / --no-x)."""
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return flags


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, for the record of every bench run."""
    return [round(x, 2) for x in os.getloadavg()]


def portable(obj: Any) -> Any:
    """``obj`` (JSON-like) with the machine paths in its strings written relative to the
    repository or with a name for their root ($TOKENSURGEON_CACHE, $TMPDIR, ~), so a result
    file can be committed (tests/test_no_machine_paths.py)."""
    from tokensurgeon import modelio

    roots = [(str(ROOT) + "/", ""), (str(ROOT), "."),
             (str(modelio.cache_dir()), "$TOKENSURGEON_CACHE"),
             (tempfile.gettempdir().rstrip("/") + "/", "$TMPDIR/"), (str(Path.home()) + "/", "~/")]
    if isinstance(obj, str):
        for old, new in roots:
            obj = obj.replace(old, new)
        return obj
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def run(main: Callable[[], None], name: str) -> None:
    """Call a bench's ``main``; bad input prints one line and exits with 2, as the CLI."""
    try:
        main()
    except UsageError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample s.d. / sqrt(n)); the error is nan for one
    value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
