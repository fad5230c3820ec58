"""spec bench's verdicts: the best gamma per draft, and a line when no gamma pays."""

from __future__ import annotations

from spec_decode.bench import verdict_lines, verdicts


def row(draft, gamma, tau, speedup=None, predicted=None, c=None, temp=0.0, batch=1):
    return {"draft": draft, "gamma": gamma, "tau": tau, "speedup": speedup,
            "predicted_speedup": predicted, "cost_ratio": c, "temperature": temp,
            "batch_size": batch, "draft_sample": "greedy"}


def test_best_gamma_by_measured_speedup_and_a_warning_when_none_pays():
    summary = {"rows": [row("fast", 1, 1.6, 1.20, 1.3, 0.2), row("fast", 2, 1.9, 1.31, 1.3, 0.2),
                        row("fast", 3, 2.0, 1.25, 1.25, 0.2),
                        row("slow", 1, 1.1, 0.80, 0.9, 0.3), row("slow", 2, 1.2, 0.70, 0.8, 0.3)]}
    out = {v["draft"]: v for v in verdicts(summary)}
    assert out["fast"]["best_gamma"] == 2 and out["fast"]["pays"]
    assert out["fast"]["speedup"] == 1.31 and out["fast"]["basis"] == "measured"
    assert out["slow"]["best_gamma"] == 1 and not out["slow"]["pays"]
    lines = verdict_lines(verdicts(summary))
    assert sum("do not deploy" in line for line in lines) == 1
    assert any(line.startswith("slow") and "do not deploy" in line for line in lines)


def test_predicted_when_nothing_was_timed_and_tau_only_without_cost():
    summary = {"rows": [row("d", 1, 1.5, predicted=1.1), row("d", 2, 1.7, predicted=1.2)]}
    (v,) = verdicts(summary)
    assert v["basis"] == "predicted" and v["best_gamma"] == 2
    hf = {"rows": [row("d", 1, 1.5), row("d", 2, 1.7)]}
    (v,) = verdicts(hf)
    assert v["basis"] is None
    assert "--backend vllm" in verdict_lines([v])[0]
