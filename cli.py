"""The ``tokensurgeon`` command line.

Boundary: parsing and printing only. Each subcommand is one config dataclass (its fields
generate the flags and ``--help``) and one function that takes it; no defaults live here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokensurgeon.config import add_config_arguments, resolve_config
from tokensurgeon.errors import UsageError


@dataclass(frozen=True)
class Command:
    config: Callable[[], type]
    run: Callable[[Any], Any]
    render: Callable[[Any], str]


def _transplant_config():
    from tokensurgeon.transplant import TransplantConfig

    return TransplantConfig


def _run_transplant(cfg):
    from tokensurgeon.transplant import transplant

    return transplant(cfg)


def _render_transplant(m: dict) -> str:
    counts = m["counts"]
    lines = [
        f"wrote {m['options']['out']}: {m['base']} with the tokenizer of {m['donor']}",
        f"  vocabulary {m['vocab_size']}: {counts['copied']} copied exactly, "
        + ", ".join(f"{n} by {k}" for k, n in counts["approximated"].items()),
    ]
    for name, stats in m["matrices"].items():
        if "heldout_relative_error_base" in stats:
            lines.append(
                f"  {name}: held-out anchors re-predicted with relative error "
                f"{stats['heldout_relative_error_base']:.3f} (cosine {stats['heldout_cosine_base']:.3f})")
    lines.append(f"  {m['seconds']['total']} s on {m['device']} ({m['threads']} threads)")
    return "\n".join(lines)


def _eval_config():
    from tokensurgeon.evaluate import EvalConfig

    return EvalConfig


def _run_eval(cfg):
    from tokensurgeon.evaluate import evaluate

    return evaluate(cfg)


def _render_eval(r: dict) -> str:
    return (f"{r['bits_per_byte']:.4f} bits/byte  ({r['model']} on {r['text']}: "
            f"{r['bytes']} bytes, {r['tokens']} tokens, {r['segments']} segments)\n"
            + json.dumps(r))


def _inspect_config():
    from tokensurgeon.inspection import InspectConfig

    return InspectConfig


def _run_inspect(cfg):
    from tokensurgeon.inspection import inspect

    return inspect(cfg)


def _spec_make_draft_config():
    from spec_decode.draft import MakeDraftConfig

    return MakeDraftConfig


def _run_spec_make_draft(cfg):
    from spec_decode.draft import make_draft

    return make_draft(cfg)


def _render_spec_make_draft(m: dict) -> str:
    if m["kind"] == "transplant":
        return f"wrote {m['options']['out']}: {m['from']} with the tokenizer of {m['target']}"
    return (f"wrote {m['options']['out']}: layers {m['kept_layers']} of {m['target_layers']} "
            f"({m['parameters']:,} of {m['target_parameters']:,} parameters) in {m['seconds']} s")


def _spec_train_config():
    from spec_decode.train import SpecTrainConfig

    return SpecTrainConfig


def _run_spec_train(cfg):
    from spec_decode.train import train

    return train(cfg)


def _render_spec_train(summary: dict) -> str:
    from spec_decode.train import render

    return render(summary)


def _spec_bench_config():
    from spec_decode.bench import SpecBenchConfig

    return SpecBenchConfig


def _run_spec_bench(cfg):
    from spec_decode.bench import bench

    return bench(cfg)


def _render_spec_bench(report: dict) -> str:
    from spec_decode.bench import render

    return render(report)


def _distill_config():
    from distill.trainer import DistillConfig

    return DistillConfig


def _run_distill(cfg):
    from distill.trainer import distill

    return distill(cfg)


def _render_distill(summary: dict) -> str:
    from distill.trainer import render

    return render(summary)


COMMANDS: dict[str, Command] = {
    "transplant": Command(_transplant_config, _run_transplant, _render_transplant),
    "eval": Command(_eval_config, _run_eval, _render_eval),
    "inspect": Command(_inspect_config, _run_inspect, lambda r: json.dumps(r, indent=2)),
    "distill": Command(_distill_config, _run_distill, _render_distill),
    "spec make-draft": Command(_spec_make_draft_config, _run_spec_make_draft, _render_spec_make_draft),
    "spec train": Command(_spec_train_config, _run_spec_train, _render_spec_train),
    "spec bench": Command(_spec_bench_config, _run_spec_bench, _render_spec_bench),
}


# Help lines for two-word command groups (e.g. "spec": "...").
GROUP_HELP: dict[str, str] = {
    "spec": "speculative decoding: make and train (DistillSpec) draft models, benchmark them",
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per COMMANDS entry; a two-word name ("spec train") becomes a
    subcommand of a group ("spec")."""
    parser = argparse.ArgumentParser(
        prog="tokensurgeon",
        description="Move knowledge between language models that do not share a tokenizer.",
    )
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


def _quiet_libraries(no_progress: bool) -> None:
    """transformers' warnings are noise for our users; its bars follow --quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if no_progress:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS[args._command_name]
    _quiet_libraries(bool(getattr(args, "quiet", False)))
    try:
        cfg = resolve_config(command.config(), args)
        result = command.run(cfg)
    except UsageError as exc:
        print(f"tokensurgeon {args._command_name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tokensurgeon {args._command_name}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(command.render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
