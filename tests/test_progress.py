"""Progress lines: quiet when asked, silent for short phases (so bad input stays one line),
plain lines on a pipe, refreshed while a slow phase runs, and a per-phase time summary."""

from __future__ import annotations

import io
import time

import pytest

from tokensurgeon import progress
from tokensurgeon.progress import Progress


def run_phases(p: Progress) -> None:
    p.start("load")
    time.sleep(0.05)
    bar = p.start("omp embed", total=10, unit="tok")
    for _ in range(5):
        time.sleep(0.1)
        bar.update(2)
    with p.phase("save"):
        time.sleep(0.3)
    p.finish()
    p.close()


def test_plain_lines_on_a_pipe_with_counts_and_a_summary():
    out = io.StringIO()
    p = Progress(stream=out, delay=0.1, interval=0.15, tty=False)
    run_phases(p)
    lines = out.getvalue().splitlines()
    assert lines and not any("\r" in line or "\x1b" in line for line in lines)
    omp = [line for line in lines if line.startswith("omp embed")]
    assert len(omp) >= 3  # refreshed while it ran, then a final "done" line
    assert omp[-1].endswith("done") and "10/10 tok" in omp[-1]
    assert not any(line.startswith("load") for line in lines)  # shorter than the delay
    summary = p.summary()
    assert summary.startswith("time per phase: load") and "omp embed" in summary
    # "save" ran inside "omp embed" (begun by start() and not yet finished): it is its child,
    # shown inside it, so the top level adds up to at most the total.
    assert set(p.seconds()) == {"load", "omp embed", "omp embed > save"}
    assert p.seconds()["omp embed"] >= 0.4 + p.seconds()["omp embed > save"] - 0.02
    assert "omp embed" in summary and "[save 0.3 s]" in summary


def test_quiet_prints_nothing_but_still_times():
    out = io.StringIO()
    p = Progress(quiet=True, stream=out, delay=0.0, interval=0.01, tty=False)
    run_phases(p)
    assert out.getvalue() == ""
    assert p.seconds()["omp embed"] > 0


def test_terminal_rewrites_one_line():
    out = io.StringIO()
    p = Progress(stream=out, delay=0.0, interval=10, tty=True)
    with p.phase("matching", total=4) as ph:
        for _ in range(4):
            time.sleep(0.3)
            ph.update()
    p.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") >= 2 and text.endswith("done\n")


def test_failed_phase_is_reported_stopped_not_done():
    out = io.StringIO()
    with pytest.raises(RuntimeError), \
            progress.use(Progress(stream=out, delay=0.0, interval=0.05, tty=False)) as p:
        p.start("load")
        time.sleep(0.4)
        raise RuntimeError("boom")
    assert "stopped" in out.getvalue() and "done" not in out.getvalue()
    assert progress.get().quiet  # the silent default is back outside the command


def test_callback_form_sets_done_and_total():
    p = Progress(quiet=True)
    with p.phase("omp") as report:
        report(3, 12)
        assert (report.done, report.total) == (3, 12)
        assert "3/12" in report.line()


def test_cli_bad_input_prints_one_line_without_quiet(tmp_path, capsys):
    """Progress is on (no --quiet) and the error still comes alone."""
    import cli

    text = tmp_path / "t.txt"
    text.write_bytes(b"caf\xe9\n")
    assert cli.main(["eval", str(tmp_path), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "offset 3" in err, err


def test_omp_batches_count_tokens_on_the_callers_phase(monkeypatch):
    """The OMP loop reports after every batch through the running phase (no bar of its own),
    so a long "omp embed" line moves batch by batch."""
    import torch

    from tokensurgeon.methods import TransplantProblem
    from tokensurgeon.methods.omp import OmpOptions, omp_rows

    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(200, 16, generator=gen)
    problem = TransplantProblem(torch.randn(40, 16, generator=gen), anchors, anchors, anchors,
                                [None] * 40, {}, options=OmpOptions(k=4, search="exact"),
                                batch_size=8)
    seen: list[int] = []
    p = Progress(quiet=True)
    original = p.report
    monkeypatch.setattr(p, "report", lambda done, *a: (seen.append(done), original(done, *a)))
    with progress.use(p), p.phase("omp embed") as ph:
        omp_rows(problem)
    assert seen == [0, 8, 16, 24, 32, 40]
    assert (ph.done, ph.total, ph.unit) == (40, 40, "tok")


def test_report_outside_any_phase_is_a_no_op():
    Progress(quiet=True).report(3, 10, "tok")


def _backend(p: Progress) -> None:
    """A callee marking phases of its own with start(), leaving the last one running."""
    p.start("target")
    time.sleep(0.02)
    p.start("draft")
    time.sleep(0.02)


def test_start_in_a_callee_nests_and_the_callers_next_start_ends_it():
    p = Progress(quiet=True)
    p.start("prompts")
    p.start("measure")
    _backend(p)  # its phases are children of "measure"
    p.start("report")  # ends "measure" and the "draft" the callee left running
    p.finish()
    p.close()
    assert [(n, [c for c, _, _ in kids]) for n, _, kids in p.tree()] == \
        [("prompts", []), ("measure", ["target", "draft"]), ("report", [])]
    assert all(ph.end is not None for ph in p.phases)
    measure = next(ph for ph in p.phases if ph.name == "measure")
    draft = next(ph for ph in p.phases if ph.name == "draft")
    assert draft.end <= measure.end  # a child never outlives its parent


def _describe(p: Progress, name: str) -> None:
    p.start(f"reading {name}")  # returns without finish(), as inspect's describe() does


def test_a_phase_left_running_by_a_returned_function_ends_at_the_next_start():
    p = Progress(quiet=True)
    _describe(p, "a")
    _describe(p, "b")  # not a child of "reading a": that call has returned
    p.start("shared tokens")
    p.close()
    assert [n for n, _, kids in p.tree() if not kids] == ["reading a", "reading b", "shared tokens"]


def test_summary_nests_children_so_each_level_adds_up():
    """The issue's case: load contains a conversion; listed side by side they exceeded the
    total."""
    p = Progress(quiet=True)
    p.start("load")
    with p.phase("converting") as conv:
        time.sleep(0.2)
        assert conv.line().startswith("load > converting (")
    with p.phase("tokenizer"):
        time.sleep(0.1)
    p.start("save")
    time.sleep(0.05)
    p.close()
    (load, load_s, kids), (save, save_s, _) = p.tree()
    assert (load, save) == ("load", "save") and [k for k, _, _ in kids] == ["converting", "tokenizer"]
    assert sum(s for _, s, _ in kids) <= load_s and load_s + save_s <= p.total_seconds()
    assert p.summary().startswith("time per phase: load 0.3 s [converting 0.2 s, tokenizer 0.1 s], save")
    assert set(p.seconds()) == {"load", "load > converting", "load > tokenizer", "save"}


def test_time_left_counts_from_where_the_count_began():
    ph = progress.Phase("train", None, "")
    ph.count_from(50, 100, "step")  # a run resumed at step 50
    ph.counted_since -= 10.0  # 10 s ago
    ph.set(60)
    assert ph.seconds_left() == pytest.approx(40.0, rel=0.01)  # 10 steps per 10 s, 40 to go
    assert "60/100 step, ~40 s left" in ph.line()
    assert progress.duration(4.25) == "4.2 s" and progress.duration(59.4) == "59 s"
    assert progress.duration(139.6) == "2 min 19 s" and progress.duration(3 * 3600 + 300) == "3 h 05 min"


def test_counter_is_a_tqdm_for_trainers_and_libraries():
    p = Progress(stream=io.StringIO(), delay=60, tty=False)
    with progress.use(p):
        p.start("train")
        bar = p.counter(4, unit="step")
        for _ in range(4):
            bar.set_postfix(loss="0.5000")
            bar.update(1)
        bar.close()  # a trainer's count stays on its phase
        train = p.phases[-1]
        assert (train.done, train.total, train.note) == (4, 4, "loss=0.5000")
        p.start("load")
        with progress.get().phase("read") as read:
            read(1, 3)
            seen = []
            for x in p.counter(iterable=[7, 8], what="loading weights"):
                seen.append((x, read.line()))
            assert "read: loading weights [" in seen[1][1] and "1/2" in seen[1][1]
            assert (read.done, read.total, read.what) == (1, 3, "")  # its own count is back
        p.finish()
        own = p.counter(2, name="writing shards")  # outside any phase: a phase of its own
        own.update(2)
        own.close()
    assert p.phases[-1].name == "writing shards" and p.phases[-1].end is not None


def test_library_bars_count_on_our_line_and_draw_nothing(capsys, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(hf_logging, "_tqdm_hook", None)
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    progress.capture_library_bars()
    p = Progress(quiet=True)
    with progress.use(p), p.phase("load") as load:
        totals = []
        for _ in hf_logging.tqdm(range(5), desc="Loading weights"):
            totals.append((load.total, load.what))
    assert totals[0] == (5, "loading weights")
    assert capsys.readouterr().err == ""  # tqdm drew nothing


def test_a_named_reporter_speaks_before_its_first_phase():
    out = io.StringIO()
    p = Progress(stream=out, delay=0.1, interval=0.2, tty=False, name="spec train")
    time.sleep(0.5)
    p.start("train")
    p.close()
    assert out.getvalue().startswith("spec train: preparing (")
    assert p.summary().startswith("time per phase: preparing 0.")


def test_no_delay_announces_every_phase_at_once():
    out = io.StringIO()
    p = Progress(stream=out, delay=0, interval=10, tty=False)
    p.start("load")
    p.start("save")
    p.close()
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == \
        ["load", "load", "save", "save"]  # begun, then done, for each


def test_a_module_importing_tqdm_itself_counts_on_our_line(monkeypatch):
    """transformers' GGUF loader calls ``tqdm(reader.tensors, desc=...)`` from tqdm directly."""
    import types

    from tqdm.auto import tqdm

    loader = types.SimpleNamespace(tqdm=tqdm)
    monkeypatch.setattr(progress, "_captured", False)
    progress.capture_module_bars(loader)
    assert loader.tqdm is tqdm  # only once the CLI has captured the libraries' bars
    monkeypatch.setattr(progress, "_captured", True)
    progress.capture_module_bars(loader)
    p = Progress(quiet=True)
    with progress.use(p), p.phase("converting") as conv:
        lines = [conv.line() for _ in loader.tqdm(["a", "b", "c"], desc="Converting and "
                                                  "de-quantizing GGUF tensors...")]
    assert "converting: converting and de-quantizing gguf tensors [" in lines[1]
    assert "1/3" in lines[1]


def test_start_inside_a_with_block_is_its_child():
    p = Progress(quiet=True)
    p.start("load")
    with p.phase("converting"):
        p.start("tensors")  # a child of "converting"; "load" goes on
        p.start("tokenizer")  # ends "tensors" only
    p.start("save")
    p.close()
    assert [(n, [(c, [g for g, _, _ in gk]) for c, _, gk in kids]) for n, _, kids in p.tree()] == \
        [("load", [("converting", ["tensors", "tokenizer"])]), ("save", [])]


def test_a_named_reporter_is_silent_when_checks_fail_within_the_delay():
    """Input checks run before the first phase: an error within the delay stays alone."""
    out = io.StringIO()
    p = Progress(stream=out, delay=0.6, interval=0.2, tty=False, name="spec train")
    time.sleep(0.3)
    p.close(ok=False)
    assert out.getvalue() == ""
