"""The ``tokensurgeon`` command line.

Boundary: parsing and printing only. Each subcommand is one config dataclass (its fields
generate the flags and ``--help``) and one function that takes it; no defaults live here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensurgeon import __version__, progress
from tokensurgeon.config import add_config_arguments, resolve_config
from tokensurgeon.errors import UsageError


def _load(path: str):
    """Import ``"module:attribute"`` lazily, so ``--help`` does not import torch models."""
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Command:
    """A subcommand: its config dataclass, the function that runs it and the one that renders
    its result, each named as ``"module:attribute"`` (or a callable for ``render_at``)."""

    config_at: str
    run_at: str
    render_at: str | Callable[[Any], str]
    # Lines printed after the summary (from the resolved config): what OUT holds, how to use it.
    after: tuple[Callable[[Any], list[str]], ...] = ()

    def config(self) -> type:
        return _load(self.config_at)

    def run(self, cfg: Any) -> Any:
        return _load(self.run_at)(cfg)

    def render(self, result: Any) -> str:
        render = self.render_at if callable(self.render_at) else _load(self.render_at)
        return render(result)


def _render_transplant(m: dict) -> str:
    counts, options = m["counts"], m["options"]
    approximated = ", ".join(f"{n} by {k}" for k, n in counts["approximated"].items())
    lines = [
        f"wrote {options['out']}: {options['base']} with the tokenizer of {options['donor']}",
        f"  vocabulary {m['vocab_size']}: {counts['copied']} copied exactly, {approximated}"
        if approximated else
        f"  vocabulary {m['vocab_size']}: all {counts['copied']} copied exactly (no new tokens)",
    ]
    for name, stats in m["matrices"].items():
        if "heldout_relative_error_base" in stats:
            mean = stats.get("heldout_relative_error_base_mean_init")
            lines.append(
                f"  {name}: {stats['heldout_tokens']} held-out shared tokens re-predicted with "
                f"relative error {stats['heldout_relative_error_base']:.3f} (0 = exact"
                + (f"; the anchor mean scores {mean:.3f}" if mean is not None else "")
                + f"), cosine {stats['heldout_cosine_base']:.3f} (1 = exact)")
    lines.append(f"  {m['seconds']['total']} s on {m['device']} ({m['threads']} threads)")
    return "\n".join(lines)


def _render_eval(r: dict) -> str:
    return (f"{r['bits_per_byte']:.4f} bits/byte  ({r['model']} on {r['text']}: "
            f"{r['bytes']} bytes, {r['tokens']} tokens, {r['segments']} segments)\n"
            + json.dumps(r))


def _render_spec_make_draft(m: dict) -> str:
    options = m["options"]
    if m["kind"] == "transplant":
        return (f"wrote {options['out']}: {options['from_model']} with the tokenizer of "
                f"{options['target']}")
    return (f"wrote {options['out']}: layers {m['kept_layers']} of {m['target_layers']} "
            f"({m['parameters']:,} of {m['target_parameters']:,} parameters) in {m['seconds']} s")


def _use_model(cfg: Any) -> list[str]:
    """How to use a model written to OUT: score it, load it, serve it."""
    out = shlex.quote(str(cfg.out))
    return ["use it:",
            f"  tokensurgeon eval {out} TEXT.txt   (bits per byte; lower is better)",
            (f"  transformers: AutoModelForCausalLM.from_pretrained({str(cfg.out)!r}), "
             f"AutoTokenizer.from_pretrained({str(cfg.out)!r})"),
            f"  vLLM: vllm serve {out}"]


def _use_draft(cfg: Any) -> list[str]:
    """How to use a draft written to OUT: measure it, serve it behind its target."""
    out, target = shlex.quote(str(cfg.out)), shlex.quote(str(cfg.target))
    spec = json.dumps({"method": "draft_model", "model": str(cfg.out),
                       "num_speculative_tokens": 3})
    return ["use it:",
            f"  tokensurgeon spec bench {target} --draft {out} --prompts PROMPTS.txt",
            f"  vLLM: vllm serve {target} --speculative-config {shlex.quote(spec)}"]


def _kept(cfg: Any) -> list[str]:
    """What OUT holds after the run, and its size (checkpoints said apart)."""
    from tokensurgeon.modelio import human_size

    out = Path(cfg.out).expanduser()
    if not out.is_dir():
        return []
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
             if p.is_dir() else p.stat().st_size for p in out.iterdir()}
    line = f"{cfg.out} holds {human_size(sum(sizes.values()))}"
    if "checkpoints" in sizes:
        steps = sorted((p.name for p in (out / "checkpoints").glob("step-*")),
                       key=lambda n: int(n.split("-")[1]) if n.split("-")[1].isdigit() else 0)
        line += (f", of which checkpoints/ ({', '.join(steps)}) {human_size(sizes['checkpoints'])}"
                 " (kept by --keep-checkpoints)")
    elif hasattr(cfg, "keep_checkpoints"):
        line += "; its checkpoints were removed as the run finished (--keep-checkpoints keeps them)"
    return [line]


COMMANDS: dict[str, Command] = {
    "transplant": Command("tokensurgeon.transplant:TransplantConfig",
                          "tokensurgeon.transplant:transplant", _render_transplant,
                          (_kept, _use_model)),
    "eval": Command("tokensurgeon.evaluate:EvalConfig", "tokensurgeon.evaluate:evaluate",
                    _render_eval),
    "inspect": Command("tokensurgeon.inspection:InspectConfig", "tokensurgeon.inspection:inspect",
                       lambda r: json.dumps(r, indent=2)),
    "distill": Command("distill.trainer:DistillConfig", "distill.trainer:distill",
                       "distill.trainer:render", (_kept, _use_model)),
    "spec make-draft": Command("spec_decode.draft:MakeDraftConfig", "spec_decode.draft:make_draft",
                               _render_spec_make_draft, (_kept, _use_draft)),
    "spec make-data": Command("spec_decode.target_data:MakeDataConfig",
                              "spec_decode.target_data:make_data",
                              "spec_decode.target_data:render"),
    "spec train": Command("spec_decode.train:SpecTrainConfig", "spec_decode.train:train",
                          "spec_decode.train:render", (_kept, _use_draft)),
    "spec bench": Command("spec_decode.bench:SpecBenchConfig", "spec_decode.bench:bench",
                          "spec_decode.bench:render"),
}


# Help lines for two-word command groups (e.g. "spec": "...").
GROUP_HELP: dict[str, str] = {
    "spec": "speculative decoding: make and train (DistillSpec) draft models, benchmark them",
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (the usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per COMMANDS entry; a two-word name ("spec train") becomes a
    subcommand of a group ("spec")."""
    parser = _OneLineParser(
        prog="tokensurgeon",
        description="Move knowledge between language models that do not share a tokenizer.",
    )
    parser.add_argument("--version", action="version", version=f"tokensurgeon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, command in COMMANDS.items():
        cls = command.config()
        doc = (cls.__doc__ or "").strip()
        summary = " ".join(doc.split(".")[0].split())
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=GROUP_HELP.get(group, group))
                groups[group] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            p = groups[group].add_parser(leaf, help=summary, description=doc)
        else:
            p = sub.add_parser(name, help=summary, description=doc)
        p.set_defaults(_command_name=name)
        add_config_arguments(p, cls)
    return parser


def _quiet_libraries() -> None:
    """transformers' warnings are noise for our users; its bars become counts on our phase
    lines (none of its own interleave with them, in a terminal or a log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    progress.capture_library_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args._command_name]
    try:
        cfg = resolve_config(command.config(), args)
        quiet = bool(getattr(cfg, "quiet", False))  # from a flag or from --config YAML
        quiet = quiet or os.environ.get("RANK", "0") != "0"  # one voice under torchrun
        _quiet_libraries()
        with progress.use(progress.Progress(quiet=quiet, name=args._command_name)) as reporter:
            result = command.run(cfg)
    except UsageError as exc:
        print(f"tokensurgeon {args._command_name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokensurgeon {args._command_name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(command.render(result))
    for lines in command.after:
        print("\n".join(lines(cfg)))
    if not quiet:
        print(reporter.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
