"""Every command speaks in a log: with stderr not a terminal, its first progress line comes
within 5 s, no library bar interleaves with ours, and it ends with a time-per-phase line
whose parts, at each level, add up to at most their parent (the total at the top).

The commands run in this process on the tiny models, so imports (2-4 s of torch and
transformers on a loaded machine) are not in the measured time; the reporter's own delay is.
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import tiny

import cli
from tokensurgeon import progress

FIRST_LINE_WITHIN_S = 5.0


class LogStream:
    """A non-terminal stderr that timestamps every line written to it."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.lines: list[tuple[float, str]] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines += [(time.perf_counter() - self.t0, line) for line in done]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def split_top(text: str) -> list[str]:
    """``"a 1.0 s [b 0.5 s, c 0.2 s], d 2.0 s"`` -> the top-level items."""
    items, depth, start, i = [], 0, 0, 0
    while i < len(text):
        depth += {"[": 1, "]": -1}.get(text[i], 0)
        if depth == 0 and text.startswith(", ", i):
            items.append(text[start:i])
            start = i = i + 2
            continue
        i += 1
    return [*items, text[start:]]


def check_level(text: str, limit: float, where: str) -> list[str]:
    """Parse one level of the summary, check it adds up to at most ``limit`` (printed values
    are rounded to 0.1 s: 0.05 s per part is allowed) and recurse; returns the names."""
    names, parts = [], []
    for item in split_top(text):
        m = re.fullmatch(r"(.+?) (\d+\.\d) s(?: \[(.*)\])?", item, re.DOTALL)
        assert m, (where, item)
        name, secs, children = m.group(1), float(m.group(2)), m.group(3)
        names.append(name)
        parts.append(secs)
        if children:
            check_level(children, secs, f"{where} > {name}")
    assert sum(parts) <= limit + 0.05 * len(parts), (where, parts, limit)
    return names


def parse_summary(line: str) -> list[str]:
    m = re.fullmatch(r"time per phase: (.*) \(total (\d+\.\d) s\)", line)
    assert m, line
    return check_level(m.group(1), float(m.group(2)), "total")


def test_summary_parser_can_fail():
    assert parse_summary("time per phase: a 1.0 s [b 0.5 s, c 0.4 s], d 2.0 s (total 3.0 s)") \
        == ["a", "d"]
    with pytest.raises(AssertionError):  # the children add up to more than their parent
        parse_summary("time per phase: load 84.0 s [converting 60.2 s, tok 26.4 s] (total 90.0 s)")
    with pytest.raises(AssertionError):  # the flat list the issue found: more than the total
        parse_summary("time per phase: load 84.0 s, converting 60.2 s, tok 16.4 s (total 117.7 s)")


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory, bpe_tokenizer):
    from spec_decode.draft import MakeDraftConfig, make_draft

    root = tmp_path_factory.mktemp("spec_progress")
    target = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), layers=4, seed=5), bpe_tokenizer,
                       root / "target")
    make_draft(MakeDraftConfig(target=str(target), out=str(root / "cut"), keep_layers="0",
                               quiet=True))
    prompts = root / "prompts.jsonl"
    rows = [{"question": q, "answer": a} for q, a in zip(tiny.CORPUS, tiny.CORPUS[1:])]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "corpus.txt"
    text.write_text("\n".join(tiny.corpus(2)))
    return {"target": target, "cut": root / "cut", "prompts": prompts, "text": text}


def command_lines(name: str, model_dirs: dict, spec: dict, out) -> tuple[list[str], dict]:
    """argv for ``name`` and the countable phases it must show: {phase: total}."""
    llama, gemma = str(model_dirs["llama_bpe"]), str(model_dirs["gemma_spm"])
    target, cut, prompts, text = (str(spec[k]) for k in ("target", "cut", "prompts", "text"))
    return {
        "inspect": (["inspect", llama, gemma], {}),
        "transplant": (["transplant", gemma, llama, str(out), "-k", "4", "--holdout", "0",
                        "--calibration-text", text], {"choose output rows": None}),
        "eval": (["eval", gemma, text, "--device", "cpu"], {"evaluate": None}),
        "distill": (["distill", "--teacher", llama, "--student", gemma, "--data", text,
                     "--out", str(out), "--batch-size", "2", "--max-length", "48",
                     "--steps", "2", "--device", "cpu"], {"train": 2}),
        "spec make-draft": (["spec", "make-draft", target, "--keep-layers", "0,3",
                             "--out", str(out)], {}),
        "spec make-data": (["spec", "make-data", target, "--prompts", prompts, "--out", str(out),
                            "--max-new-tokens", "4", "--backend", "hf", "--batch-size", "2",
                            "--device", "cpu"], {"generate (hf)": len(tiny.CORPUS) - 1}),
        "spec train": (["spec", "train", target, cut, "--data", prompts, "--out", str(out),
                        "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
                        "--heldout", "2", "--device", "cpu"], {"train": 2}),
        "spec bench": (["spec", "bench", target, "--draft", cut, "--prompts", prompts,
                        "--num-prompts", "2", "--max-tokens", "4", "--gamma", "2",
                        "--temperature", "0", "--backend", "hf", "--device", "cpu",
                        "--out", str(out)], {"target T=0": 2, "draft cut": 2}),
    }[name]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_speaks_in_a_log(name, model_dirs, spec_files, tmp_path, monkeypatch,
                                        capsys):
    argv, counted = command_lines(name, model_dirs, spec_files, tmp_path / "out")
    reporters: list[progress.Progress] = []
    real_init = progress.Progress.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        reporters.append(self)

    monkeypatch.setattr(progress.Progress, "__init__", recording_init)
    log = LogStream()
    monkeypatch.setattr(sys, "stderr", log)
    assert cli.main(argv) == 0, log.lines
    capsys.readouterr()

    assert log.lines, f"{name} printed nothing to a log"
    first_at, _ = log.lines[0]
    assert first_at <= FIRST_LINE_WITHIN_S, (name, log.lines)
    text = "\n".join(line for _, line in log.lines)
    assert "\r" not in text and "\x1b" not in text and "it/s" not in text, text  # no tqdm
    names = parse_summary(log.lines[-1][1])
    assert set(names) - {progress.PREPARING}, (name, log.lines[-1])  # real phases, named

    (reporter,) = reporters
    assert reporter.name == name and not reporter._active  # every phase ended
    total = reporter.total_seconds()

    def check(nodes, limit):
        assert sum(secs for _, secs, _ in nodes) <= limit + 1e-6
        for _, secs, kids in nodes:
            check(kids, secs)

    check(reporter.tree(), total)
    by_name = {ph.name: ph for ph in reporter.phases}
    for phase, total_count in counted.items():  # countable work shows done/total
        ph = by_name[phase]
        assert ph.total, (name, phase)
        assert total_count is None or ph.total == total_count, (phase, ph.total)
