"""Shared training pieces: schedule, checkpoints (atomic, pruned, exact restore), metrics."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tokensurgeon import training


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # only trainable parameters are checkpointed
    optimizer = training.build_optimizer([p for p in model.parameters() if p.requires_grad], 0.1)
    scheduler = training.warmup_then_linear_decay(optimizer, warmup_steps=2, total_steps=6)
    return model, optimizer, scheduler


def step(model, optimizer, scheduler) -> float:
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    training.clip_gradients(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return float(loss.detach())


def test_fused_optimizer_takes_the_per_tensor_loops_steps():
    """build_optimizer picks torch's fused AdamW on CPU; it must update like the loop."""
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(3)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]
    finals = []
    for make in (lambda ps: training.build_optimizer(ps, 0.1),
                 lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.95), weight_decay=0.01,
                                              foreach=False)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            optimizer.step()
        finals.append([p.detach() for p in params])
    assert training.build_optimizer([torch.nn.Parameter(torch.zeros(2))], 0.1).defaults["fused"]
    for fused, loop in zip(*finals):
        assert not torch.equal(fused, start[0] if fused.dim() == 2 else start[1])
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)


def test_keep_freed_memory_is_safe_to_call_twice():
    first = training.keep_freed_memory()
    assert training.keep_freed_memory() == first
    assert torch.ones(1 << 20).sum() == 1 << 20  # large allocations still work


def test_warmup_then_linear_decay():
    _, optimizer, scheduler = tiny_setup()
    lrs = []
    for _ in range(7):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.075, 0.05, 0.025, 0.0])
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert optimizer.defaults["weight_decay"] == 0.01


def test_checkpoint_restores_exactly_and_keeps_the_newest(tmp_path):
    model, optimizer, scheduler = tiny_setup()
    for n in range(1, 4):
        step(model, optimizer, scheduler)
        training.save_checkpoint(tmp_path, n, model, optimizer, scheduler, {"seen": n * 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert training.latest_checkpoint(tmp_path).name == "step-3"
    random.random()
    expected = [step(model, optimizer, scheduler), random.random()]

    other, opt2, sched2 = tiny_setup(seed=1)
    at, extra = training.load_checkpoint(tmp_path / "step-3", other, opt2, sched2)
    assert (at, extra) == (3, {"seen": 9})
    # The frozen layer is not in the checkpoint: it keeps its own (seed-1) weights.
    assert not torch.equal(other[0].weight, model[0].weight)
    other[0].load_state_dict(model[0].state_dict())
    random.random()
    assert [step(other, opt2, sched2), random.random()] == expected


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "step-9").mkdir()  # no completion marker: a save that was cut short
    assert training.latest_checkpoint(tmp_path) is None


def test_metrics_log_appends_json_lines(tmp_path):
    log = training.MetricsLog(tmp_path / "m.jsonl")
    log.log(step=1, loss=0.5)
    log.log(step=2, loss=float("nan"))
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] is None
    training.MetricsLog(tmp_path / "off.jsonl", enabled=False).log(step=1)
    assert not (tmp_path / "off.jsonl").exists()


def _checkpointed_run(root, steps=(1, 2, 3)):
    model, optimizer, scheduler = tiny_setup()
    for s in steps:
        step(model, optimizer, scheduler)
        training.save_checkpoint(root, s, model, optimizer, scheduler, keep=3)


def test_a_finished_run_drops_its_checkpoints_unless_kept(tmp_path):
    kept_root, dropped_root = tmp_path / "kept" / "checkpoints", tmp_path / "dropped" / "checkpoints"
    _checkpointed_run(kept_root)
    _checkpointed_run(dropped_root)
    size = sum(f.stat().st_size for f in kept_root.rglob("*") if f.is_file())
    assert training.finish_checkpoints(kept_root, keep=True) == {
        "kept": ["step-1", "step-2", "step-3"], "bytes": size, "removed_bytes": 0}
    assert training.latest_checkpoint(kept_root).name == "step-3"
    assert training.finish_checkpoints(dropped_root, keep=False) == {
        "kept": [], "bytes": 0, "removed_bytes": size}
    assert not dropped_root.exists() and dropped_root.parent.is_dir()
    assert training.finish_checkpoints(tmp_path / "none", keep=False)["removed_bytes"] == 0


def test_both_trainers_take_the_shared_options_with_one_meaning():
    """distill and spec train include TrainingOptions: every shared flag exists in both with
    the same help; a command may give it its own default only through own_default."""
    import dataclasses

    from distill.trainer import DistillConfig
    from spec_decode.train import SpecTrainConfig

    shared = {f.name: f for f in dataclasses.fields(training.TrainingOptions)}
    assert {"weight_decay", "grad_accum", "trust_remote_code", "resume"} <= set(shared)
    for cls in (DistillConfig, SpecTrainConfig):
        own = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in shared.items():
            assert own[name].metadata["help"] == f.metadata["help"], (cls.__name__, name)
    assert DistillConfig.__dataclass_fields__["weight_decay"].default == 0.01
    assert SpecTrainConfig.__dataclass_fields__["weight_decay"].default == 0.0


@pytest.mark.parametrize("options, needle", [
    ({"resume": True, "overwrite": True}, "contradict"), ({"grad_accum": 0}, "--grad-accum"),
    ({"weight_decay": -1.0}, "--weight-decay"), ({"lr": -1.0}, "--lr")])
def test_shared_options_refuse_bad_values(options, needle):
    from tokensurgeon.errors import UsageError

    with pytest.raises(UsageError, match=needle):
        training.TrainingOptions(**options).validate()


def test_micro_batches_and_checkpoint_schedule():
    from tokensurgeon.errors import UsageError

    assert training.micro_batch_size(8, 2, 2) == 2
    with pytest.raises(UsageError, match="multiple of processes x --grad-accum = 6"):
        training.micro_batch_size(8, 2, 3)
    assert [s for s in range(1, 8) if training.checkpoint_due(s, 3, 7)] == [3, 6, 7]


def test_a_run_starts_out_fresh_or_resumes_its_checkpoint(tmp_path):
    """start_run on a fresh OUT drops a previous run's files and writes the config; --resume
    restores the newest checkpoint and forgets metrics logged after it."""
    import dataclasses

    from tokensurgeon.errors import UsageError

    @dataclasses.dataclass
    class Cfg(training.TrainingOptions):
        out: str = dataclasses.field(default=str(tmp_path / "out"), metadata={"help": "OUT"})

    out = training.prepare_out(Cfg())
    (out / "checkpoints" / "step-9").mkdir(parents=True)
    model, optimizer, scheduler = tiny_setup()
    start, log = training.start_run(Cfg(), out, model, optimizer, scheduler)
    assert start == 0 and not (out / "checkpoints").exists() and (out / "config.yaml").is_file()
    for n in (1, 2, 3):
        log.log(**training.step_figures(n, 0.5, 1.0, 0.1, 10, 2.0))
    training.save_checkpoint(out / "checkpoints", 2, model, optimizer, scheduler)
    with pytest.raises(UsageError, match="already exists"):
        training.prepare_out(Cfg())
    with pytest.raises(UsageError, match="differ from the checkpointed run.*steps"):
        training.prepare_out(Cfg(resume=True, steps=7))
    resumed = Cfg(resume=True, quiet=True)
    assert training.prepare_out(resumed) == out
    start, log = training.start_run(resumed, out, *tiny_setup(seed=1))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert start == 2 and [r["step"] for r in rows] == [1, 2]
    assert rows[0]["tokens_per_s"] == 5.0 and rows[0]["tokens"] == 10
    with pytest.raises(UsageError, match="no checkpoint"):
        training.prepare_out(Cfg(resume=True, out=str(tmp_path / "none")))
    # A run saved before an option existed resumes when the option keeps its default.
    saved = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text("\n".join(line for line in saved.splitlines()
                                               if not line.startswith("grad_accum:")))
    assert training.prepare_out(resumed) == out
    with pytest.raises(UsageError, match="differ from the checkpointed run.*grad_accum"):
        training.prepare_out(Cfg(resume=True, grad_accum=2))


def test_a_finished_run_keeps_its_best_checkpoint(tmp_path):
    """Without --keep-checkpoints a finished run drops its resume state but not
    checkpoints/best (the best held-out step, a result of the run)."""
    root = tmp_path / "checkpoints"
    _checkpointed_run(root)
    _checkpointed_run(root / training.BEST_DIR, steps=(2,))
    kept = training.finish_checkpoints(root, keep=False)
    assert kept["kept"] == ["best/step-2"] and kept["removed_bytes"] > 0
    assert sorted(p.name for p in root.iterdir()) == [training.BEST_DIR]
    assert training.latest_checkpoint(root / training.BEST_DIR).name == "step-2"
