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
    with pytest.raises(RuntimeError):
        with progress.use(Progress(stream=out, delay=0.0, interval=0.05, tty=False)) as p:
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
