"""Training pieces shared by the ``distill`` (ALM) and ``spec_decode`` (DistillSpec) trainers.

Boundary: devices, optimisation, checkpoints, progress and logs. No losses, no data and no
model architecture live here; each trainer stays one readable loop in its own module and
calls these pieces (there is no base class to inherit from).

API (all functions are small; read them):

- ``setup_accelerator(device, seed)`` -> ``accelerate.Accelerator``. ``device`` is ``auto``,
  ``cpu``, ``cuda`` or ``cuda:N``; ``accelerate launch`` / ``torchrun`` environments give
  several processes (gloo on CPU). Seeds every RNG identically on every process.
- ``build_optimizer(params, lr, weight_decay=0.01)`` -> AdamW with betas (0.9, 0.95), the
  fused kernel where torch has one for the parameters' device (7x less CPU per step than
  the per-tensor loop on a 257M-parameter student; same update).
- ``keep_freed_memory()``: glibc only; freed blocks stay in the process instead of going
  back to the kernel, so a step's large temporaries are not page-faulted in again on every
  step (called by ``setup_accelerator``).
- ``release_freed_memory()``: glibc only; hand the heap's free pages back to the kernel now
  (after a trainer drops its optimizer state, before a save that copies every weight).
- ``warmup_then_linear_decay(optimizer, warmup_steps, total_steps)`` -> LambdaLR scheduler.
- ``average_gradients(accelerator, params)``: all-reduce (mean) the ``.grad`` of ``params``
  across processes. Trainers call it once per optimizer step instead of wrapping the model
  in DDP, so any forward path (chunked heads, recomputation, peft) stays data-parallel.
- ``clip_gradients(params, max_norm=1.0)`` -> the total norm before clipping.
- ``apply_gradients(accelerator, params, optimizer, scheduler)`` -> the norm: average,
  clip, step the optimizer and the schedule, clear the gradients (one optimizer step).
- ``trainable_state(model)`` / ``load_trainable_state(model, tensors)``: the parameters with
  ``requires_grad`` (the full model, a LoRA adapter, or embeddings only), by name.
- ``save_checkpoint(root, step, model, optimizer, scheduler, extra, write=True)``: atomically writes
  ``root/step-N/`` (trainable weights as safetensors; optimizer, scheduler, RNG and the
  trainer's ``extra`` dict, e.g. its data position, via ``torch.save`` of plain state dicts)
  and keeps the newest ``keep`` checkpoints.
- ``latest_checkpoint(root)`` -> the newest complete ``step-N`` directory or None.
- ``finish_checkpoints(root, keep)``: at the end of a finished run, remove ``root`` (it
  can no longer be resumed) unless ``keep`` (``--keep-checkpoints``); returns what is kept.
- ``load_checkpoint(path, model, optimizer, scheduler)`` -> ``(step, extra)``; restores RNG
  too, and unpickles with ``weights_only=True`` only.
- ``MetricsLog(path)``: append one JSON object per step (``log(step=..., **figures)``).
- ``progress(total, initial, disable)``: the step count on the running phase's line (done/total
  and the time left, see :mod:`tokensurgeon.progress`); ``bar.set_postfix(loss=..., tok_s=...)``.

The scaffold both trainers share (same flags, same meanings):

- ``TrainingOptions``: the shared config fields (steps, batch size, ``--grad-accum``,
  learning rate and warm-up, ``--weight-decay``, checkpoint interval, ``--resume``,
  ``--overwrite``, seed, device, ``--trust-remote-code``, quiet); a command's config
  includes it and changes a default with ``own_default(name, value)``.
- ``micro_batch_size(batch_size, processes, grad_accum)``: the batch split, or the error.
- ``prepare_out(cfg, free)``: OUT checked before anything loads (fresh, ``--overwrite``, or a
  ``--resume`` of the same options).
- ``start_run(cfg, out, model, optimizer, scheduler, is_main)`` -> ``(step, MetricsLog)``.
- ``checkpoint_due(step, every, total)``; ``step_figures(...)``: the shared metric names.
- ``save_final(cfg, out, model, tokenizer, files)``: the finished model replaces OUT.
- ``check_precision(device, dtype)``, ``autocast(device, dtype)``, ``grad_scaler(device,
  dtype)``: ``fp32|bf16|fp16`` as autocast over fp32 master weights; one code path for
  CPU and GPU (fp16 adds loss scaling, a no-op object otherwise).
- ``enable_gradient_checkpointing(model)``: recompute each decoder layer in the backward.
- ``check_trackers(report_to)`` / ``start_trackers(accelerator, report_to, config)``:
  accelerate's experiment trackers (TensorBoard works offline).

Sharded training (FSDP2, the same code on CPU/gloo and GPU/NCCL):

- ``ModelCall(model)``: runs ``fn(model, *args)`` as its forward; a trainer calls every use
  of its model's weights through it, sharded or not. ``shard(call, layers, device, n)``
  makes it the FSDP root, each decoder layer a unit of its own; ``is_sharded(model)``.
- ``adopt_fsdp_launch()``: ``accelerate launch --use_fsdp`` asked for sharding (which
  the trainer then does itself).
- ``full_state_dict(model)``: a sharded model's full weights on the main process (for
  ``save_final(..., state_dict=...)``); ``save_checkpoint`` / ``load_checkpoint`` gather
  and re-shard a sharded model's weights and optimizer state themselves (every process
  calls them; ``write`` on the main one).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tokensurgeon import modelio
from tokensurgeon import progress as progress_lines
from tokensurgeon.config import check_resume_options, write_resolved_config
from tokensurgeon.errors import UsageError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "complete"


def setup_accelerator(device: str = "auto", seed: int = 0, report_to: str = "none",
                      project_dir: str | Path | None = None):
    """An ``Accelerator`` on ``device`` with every RNG seeded to ``seed``; ``report_to``
    names an accelerate tracker (``none``: no tracker) writing under ``project_dir``.

    Several processes come from the launcher's environment (``accelerate launch``,
    ``torchrun``); on CPU they talk over gloo.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    keep_freed_memory()
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    tracking = {} if report_to == "none" else {"log_with": report_to,
                                               "project_dir": str(project_dir)}
    accelerator = Accelerator(cpu=cpu, **tracking)
    if device.startswith("cuda:") and accelerator.num_processes == 1:
        torch.cuda.set_device(torch.device(device))
    set_seed(seed)
    return accelerator


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve every allocation from its heap and never trim it.

    A training step allocates and frees temporaries of hundreds of MB (the [rows, V] logits
    of a 262k vocabulary); by default glibc maps each with ``mmap`` and unmaps it on free,
    so the kernel zero-fills the same pages again on every step (17-37% of a step's CPU
    time measured on the tokenizer-transfer student). Returns False where there is no
    glibc (nothing is changed). Peak RSS grows by what the allocator keeps (~0.5 GB there).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def release_freed_memory() -> bool:
    """Return the free pages of glibc's heap to the kernel (``malloc_trim(0)``), so that what
    :func:`keep_freed_memory` keeps stops counting in the process's RSS. Returns False where
    there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return False
    return bool(ctypes.CDLL(name).malloc_trim(0))


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with betas (0.9, 0.95) over the trainable ``params``; torch's fused kernel when
    every parameter is a floating-point tensor on a CPU or CUDA device."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                 for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=fused or None)


def warmup_then_linear_decay(optimizer: torch.optim.Optimizer, warmup_steps: int,
                             total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning-rate factor rising linearly to 1 over ``warmup_steps``, then falling
    linearly to 0 at ``total_steps``."""
    warmup_steps = max(0, warmup_steps)
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = total_steps - step
        return max(0.0, remaining / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def average_gradients(accelerator, params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each ``.grad`` by its mean over processes (a no-op with one process).

    Gradients are flattened into one buffer so there is a single all-reduce per step.
    Parameters sharded by FSDP (DTensors, see :func:`shard`) are left alone: their
    gradients were already averaged over processes (reduce-scattered) in the backward.
    """
    if accelerator.num_processes == 1:
        return
    params = [p for p in params if p.requires_grad and not _is_dtensor(p)]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def clip_gradients(params: Iterable[torch.nn.Parameter], max_norm: float = 1.0) -> float:
    """Clip the global gradient norm to ``max_norm``; return the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def apply_gradients(accelerator, params: list[torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer, scheduler: Any,
                    max_norm: float = 1.0, scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer step from the accumulated ``.grad``: average over processes, clip the
    global norm to ``max_norm``, step the optimizer and the schedule, clear the gradients.
    ``scaler`` (fp16, see :func:`grad_scaler`) unscales before clipping and skips a step
    whose gradients overflowed. Returns the norm before clipping."""
    average_gradients(accelerator, params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor for every parameter with ``requires_grad`` (tied weights once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (from :func:`trainable_state`) into ``model``'s parameters."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"checkpoint holds parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store a list.
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any,
                    extra: dict[str, Any] | None = None, keep: int = 2, *,
                    write: bool = True) -> Path:
    """Atomically write ``root/step-{step}``; keep only the newest ``keep`` checkpoints.

    ``extra`` must hold plain data (numbers, strings, lists, dicts, tensors); trainers put
    their data position there. A model sharded by FSDP (:func:`shard`) has its full
    trainable weights and optimizer state gathered first, which every process takes part
    in: call it on all processes, with ``write`` True on the main one only (the same files
    as an unsharded run, but the optimizer state keyed by parameter name).
    """
    root = Path(root)
    final = root / f"step-{step}"
    if is_sharded(model):
        weights, optimizer_state = gathered_trainable_state(model, optimizer)
    elif write:
        weights, optimizer_state = trainable_state(model), optimizer.state_dict()
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({
        "step": step,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "extra": extra or {},
    }, tmp / "training_state.pt")
    (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# Help text of the trainers' --keep-checkpoints option (one wording for both).
KEEP_CHECKPOINTS_HELP = (
    "keep OUT/checkpoints when the run finishes (by default they are removed then: a finished "
    "run cannot be resumed, since --resume refuses a changed --steps, and a full-model "
    "checkpoint with its AdamW state is ~3x the model's size)")


# Under OUT/checkpoints: the checkpoint with the best held-out score (--eval-every).
BEST_DIR = "best"


def finish_checkpoints(root: str | Path, keep: bool) -> dict[str, Any]:
    """What a finished run keeps of its checkpoints under ``root`` (``OUT/checkpoints``).

    Checkpoints exist so that a killed run can ``--resume``; a run that finished has nothing
    left to resume (the learning-rate schedule ends at ``--steps``, which ``--resume`` may not
    change), so unless ``keep`` the folder is removed, but for ``best/`` (the best held-out
    checkpoint, a result of the run). Call it after the final model is in OUT: a run killed
    before that keeps its checkpoints.

    Returns:
        {"kept": [step directory names], "bytes": their total size, "removed_bytes": size
        of what was removed}.
    """
    root = Path(root)
    if not root.is_dir():
        return {"kept": [], "bytes": 0, "removed_bytes": 0}

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    if keep:
        kept = [p.name for p in _checkpoints(root)]
        if (root / BEST_DIR).is_dir():
            kept += [f"{BEST_DIR}/{p.name}" for p in _checkpoints(root / BEST_DIR)]
        return {"kept": kept, "bytes": size(root), "removed_bytes": 0}
    removed = 0
    for entry in list(root.iterdir()):
        if entry.name == BEST_DIR:  # the best held-out checkpoint is a result, not resume state
            continue
        removed += size(entry) if entry.is_dir() else entry.stat().st_size
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    best = [f"{BEST_DIR}/{p.name}" for p in _checkpoints(root / BEST_DIR)] \
        if (root / BEST_DIR).is_dir() else []
    if not best:
        shutil.rmtree(root)
    return {"kept": best, "bytes": size(root) if best else 0, "removed_bytes": removed}


def _checkpoints(root: Path) -> list[Path]:
    found = []
    for path in root.glob("step-*"):
        m = CHECKPOINT_PATTERN.match(path.name)
        if m and (path / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step-N`` directory under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = _checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any) -> tuple[int, dict]:
    """Restore a :func:`save_checkpoint` directory in place; return ``(step, extra)``.
    A model sharded by FSDP takes its shards of the full weights and optimizer state (every
    process calls it)."""
    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
    if is_sharded(model):
        load_sharded_state(model, optimizer, tensors, state["optimizer"])
    else:
        load_trainable_state(model, tensors)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), state["extra"]


class MetricsLog:
    """Append-only JSONL: one object per call to :meth:`log`, flushed at once."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def log(self, **figures: Any) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in figures.items()}
        clean.setdefault("time", round(time.time(), 3))
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def drop_after(self, step: int) -> None:
        """Forget rows a killed run logged after ``step`` (its last checkpoint); a resumed
        run redoes those steps. Lines cut short by the kill are dropped too."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                continue
        self.path.write_text("".join(kept))


def progress(total: int, initial: int = 0, disable: bool = False,
             desc: str = "train") -> progress_lines.Counter:
    """Steps done of ``total`` on the running phase's line (a phase ``desc`` of its own outside
    any); trainers set ``loss`` and ``tok_s`` as postfix. ``disable`` is kept for callers: the
    command's reporter is already silent under --quiet and on every process but the first."""
    return progress_lines.get().counter(total, initial, unit="step", name=desc)


# ---------------------------------------------------------------------------- one scaffold
# The options and chores every trainer shares: its command config includes
# :class:`TrainingOptions`, and its loop calls the functions below, so OUT, --resume,
# checkpoints, the final save and the metric names mean the same in every trainer.

# Options that may change between a run and its --resume without changing the result;
# a trainer adds its own (e.g. where a cache lives).
RESUME_FREE_OPTIONS = frozenset({"resume", "overwrite", "quiet", "device", "keep_checkpoints"})
# Metric names every trainer logs per step (besides its own figures).
STEP, LOSS, GRAD_NORM, LR, TOKENS, TOKENS_PER_S = ("step", "loss", "grad_norm", "lr", "tokens",
                                                   "tokens_per_s")


@dataclass(kw_only=True)
class TrainingOptions:
    """The options every trainer takes (fields of its command's config, so one meaning and
    one ``--help`` line each). A command whose default differs declares the field again
    with :func:`own_default`; these defaults hold everywhere else."""

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=8, metadata={
        "help": "sequences per optimizer step, all processes and micro-batches together"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per step per process (same result, less memory)"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=10, metadata={"help": "linear learning-rate warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: bool = field(default=False, metadata={"help": KEEP_CHECKPOINTS_HELP})
    resume: bool = field(default=False, metadata={
        "help": "continue from the newest checkpoint under OUT (the options must be the same)"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    seed: int = field(default=0, metadata={"help": "seed for data order, sampling and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "allow custom model code (off: safer)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def validate(self) -> None:
        """Refuse bad shared options (a trainer's ``validate`` calls this, then checks its own)."""
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.lr >= 0:  # 0 is allowed: a run that only measures
            raise UsageError(f"--lr must be >= 0 (got {self.lr})")
        if self.warmup_steps < 0:
            raise UsageError("--warmup-steps must be >= 0")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite contradict each other; pass one")


def own_default(name: str, default: Any) -> Any:
    """A command's own default for the :class:`TrainingOptions` field ``name``; its help
    stays the shared one (``steps: int = own_default("steps", 200)``)."""
    shared = {f.name: f for f in fields(TrainingOptions)}[name]
    return field(default=default, metadata=shared.metadata, kw_only=True)


def micro_batch_size(batch_size: int, processes: int, grad_accum: int) -> int:
    """Sequences per micro-batch: ``batch_size`` split over processes and micro-batches."""
    per, rest = divmod(batch_size, processes * grad_accum)
    if rest or per == 0:
        raise UsageError(f"--batch-size {batch_size} must be a multiple of processes x "
                         f"--grad-accum = {processes * grad_accum}")
    return per


def prepare_out(cfg: Any, free: Iterable[str] = ()) -> Path:
    """Check ``cfg.out`` before anything is loaded: a fresh OUT (or ``--overwrite``), or a
    ``--resume`` with a complete checkpoint and the options it was written with (those in
    ``free`` and :data:`RESUME_FREE_OPTIONS` may differ). Nothing is written."""
    out = Path(cfg.out).expanduser()
    if not cfg.resume:
        return modelio.check_output_dir(out, cfg.overwrite)
    if latest_checkpoint(out / "checkpoints") is None:
        raise UsageError(f"--resume found no checkpoint under {out}/checkpoints; "
                         "run without --resume first")
    check_resume_options(out, cfg, RESUME_FREE_OPTIONS | set(free))
    return out


def start_run(cfg: Any, out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any, is_main: bool = True) -> tuple[int, MetricsLog]:
    """Restore the newest checkpoint (``--resume``) or start OUT afresh, write the resolved
    config, and open the metrics log; returns ``(first step, log)``.

    A fresh run creates OUT only now that writing starts (bad input leaves nothing) and
    drops a previous run's checkpoints and metrics; under ``--overwrite`` the old model
    stays until :func:`save_final` replaces it. A resumed run forgets the metrics rows a
    killed run logged after its last checkpoint."""
    start = 0
    if cfg.resume:
        start, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"), model, optimizer,
                                   scheduler)
    if is_main:
        if not cfg.resume:
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise UsageError(f"cannot write into {out} ({exc.strerror}); choose a writable "
                                 "OUT") from None
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        write_resolved_config(out, cfg)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=is_main)
    if cfg.resume:
        metrics.drop_after(start)
    return start, metrics


def checkpoint_due(step: int, every: int, total: int) -> bool:
    """After optimizer step ``step`` (1-based): every ``every`` steps and at the last one."""
    return step % every == 0 or step == total


def step_figures(step: int, loss: float, grad_norm: float, lr: float, tokens: int,
                 seconds: float) -> dict[str, Any]:
    """The figures every trainer logs for an optimizer step, under the shared names;
    ``tokens`` are the trained (student / draft) tokens of the step, all processes."""
    return {STEP: step, LOSS: loss, GRAD_NORM: grad_norm, LR: lr, TOKENS: tokens,
            TOKENS_PER_S: tokens / max(seconds, 1e-9)}


def save_final(cfg: Any, out: Path, model: torch.nn.Module, tokenizer,
               files: dict[str, dict] | None = None, carry: Iterable[str] = (),
               finish: Callable[[Path], None] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Replace OUT atomically with the trained ``model`` (a LoRA adapter merged in), its
    tokenizer, the resolved config and ``files`` (name -> JSON object); the run's
    checkpoints, metrics, tracker logs and the entries named in ``carry`` move along, and
    the checkpoints are then dropped unless ``cfg.keep_checkpoints``
    (:func:`finish_checkpoints`; the best checkpoint stays). ``finish(dir)`` runs on the
    saved directory before the rename (a caller's own fix-up of the files). Call on the
    main process only; a model sharded by FSDP is saved from ``state_dict``, its full
    weights (:func:`full_state_dict`, gathered on every process). Returns what
    :func:`finish_checkpoints` kept."""
    final = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    final.eval()
    with modelio.atomic_output_dir(out, overwrite=True) as tmp:
        modelio.save_model(final, tokenizer, tmp, state_dict=state_dict)
        if finish is not None:
            finish(tmp)
        write_resolved_config(tmp, cfg)
        for name, data in (files or {}).items():
            modelio.write_json(tmp / name, data)
        # Renames within one directory: cheap, and last so a failed save keeps them in OUT.
        for name in ("metrics.jsonl", "checkpoints", TRACKER_DIR, *carry):
            if (out / name).exists():
                os.replace(out / name, tmp / name)
    return finish_checkpoints(out / "checkpoints", cfg.keep_checkpoints)


# ------------------------------------------------------------------ precision and memory

DTYPES = ("fp32", "bf16", "fp16")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX): without it torch
    emulates bf16 matrix products, measured ~130x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def check_precision(device: torch.device, dtype: str) -> None:
    """Refuse a ``dtype`` the device cannot run fast (one line naming the fix)."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return
    if device.type == "cpu":
        if dtype == "fp16":
            raise UsageError("--dtype fp16 is for GPUs (CPUs have no fast fp16 matrix "
                             "products); use --dtype bf16 or fp32 on a CPU")
        if not cpu_supports_bf16():
            raise UsageError("--dtype bf16 on this CPU (no AVX512-BF16/AMX) is emulated and "
                             "~130x slower than fp32; use --dtype fp32")
    elif device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bf16 needs an Ampere or newer GPU; use --dtype fp16 here")


def autocast(device: torch.device, dtype: str):
    """Autocast context for forward passes: ``bf16``/``fp16`` compute over fp32 master
    weights (the optimizer, gradients and weights stay fp32); ``fp32`` is a no-op."""
    return torch.autocast(device.type, dtype=_TORCH_DTYPES.get(dtype, torch.bfloat16),
                          enabled=dtype != "fp32")


def grad_scaler(device: torch.device, dtype: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose gradients underflow); disabled, a pass-through, else."""
    return torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping
    them (memory ~ one layer's activations instead of all layers')."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ------------------------------------------------------------------ experiment trackers

# Tracker logs go to OUT/tensorboard (the project name given to accelerate).
TRACKER_DIR = "tensorboard"
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive")


def check_trackers(report_to: str) -> None:
    """Refuse a tracker whose package is missing, before anything is loaded."""
    if report_to == "none":
        return
    if report_to not in TRACKERS:
        raise UsageError(f"--report-to {report_to!r}: use one of {', '.join(TRACKERS)}")
    import importlib.util

    package = {"tensorboard": "tensorboard", "comet_ml": "comet_ml"}.get(report_to, report_to)
    if importlib.util.find_spec(package) is None and not (
            report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        hint = "'tokensurgeon[track]'" if report_to == "tensorboard" else package
        raise UsageError(f"--report-to {report_to} needs the {package} package; run: "
                         f"pip install {hint}")


def start_trackers(accelerator, report_to: str, config: dict[str, Any]) -> None:
    """Start the accelerator's trackers (logs under ``project_dir/``:data:`TRACKER_DIR`)
    with the run's resolved options as hyperparameters (plain numbers and strings only,
    which every tracker takes)."""
    if report_to == "none":
        return
    plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
             for k, v in config.items()}
    accelerator.init_trackers(TRACKER_DIR, config=plain)


# ------------------------------------------------------------------ sharded training (FSDP)

# Set by ``accelerate launch --use_fsdp`` (and by an accelerate config file whose
# distributed_type is FSDP).
ACCELERATE_FSDP_ENV = "ACCELERATE_USE_FSDP"


def adopt_fsdp_launch() -> bool:
    """True when ``accelerate launch --use_fsdp`` asked for FSDP. The trainer then shards
    the model itself (:func:`shard`), and accelerate's own FSDP is turned off in this
    process: accelerate applies it only to what ``accelerator.prepare`` wraps, refuses it on
    CPUs (``sync_module_states``), and its ``cpu_ram_efficient_loading`` has transformers
    give every process but the first zeros for weights, which only ``prepare`` broadcasts.
    Call it before :func:`setup_accelerator` and before any model is loaded."""
    if os.environ.get(ACCELERATE_FSDP_ENV, "false").lower() not in ("true", "1"):
        return False
    os.environ[ACCELERATE_FSDP_ENV] = "false"
    return True


class ModelCall(torch.nn.Module):
    """Runs ``fn(model, *args)`` as its forward: the one way a trainer calls its model, so
    a sharded and an unsharded run take the same code path.

    Under FSDP (:func:`shard`) this module is the root: FSDP gathers a module's full
    parameters only inside that module's forward, and reduce-scatters (averages) the
    gradients of what it gathered in the backward. Code that reads weights directly and not
    through a submodule's forward (the fused head's closed-form backward reads
    ``lm_head.weight``; tied embeddings share it; held-out scoring) therefore runs as
    ``fn``: there the root's parameters (embeddings, final norm, head) are full tensors and
    each decoder layer gathers its own while it runs.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def shard(call: ModelCall, layers: Iterable[torch.nn.Module], device: torch.device,
          processes: int) -> ModelCall:
    """Shard ``call.model`` over ``processes`` with FSDP2 (``fully_shard``), in place: each
    of ``layers`` (the decoder layers) is one unit, the rest (embeddings, norms, the head,
    tied or not) the root unit ``call``. Parameters stay fp32 (``--dtype`` autocasts in
    the forward); every process holds 1/``processes`` of each (DTensors on ``device``).
    Returns ``call``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (processes,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(call, mesh=mesh)
    return call


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when FSDP shards ``model``'s parameters (they are DTensors)."""
    return any(_is_dtensor(p) for p in model.parameters())


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full tensors on the CPU of the main process only ({} on the others).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights of a sharded ``model`` on the main process's CPU ({} on the
    others; every process must call it): its ``state_dict`` names, tied weights as one
    tensor, as ``save_pretrained`` expects them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_full_options())
    if not full:
        return {}
    # Tied names (the head and the embeddings) hold the same DTensor: give them one tensor.
    first: dict[int, str] = {}
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(tensor), name)
        out[name] = out[owner] if owner != name else full[name]
    return out


def gathered_trainable_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                             ) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`trainable_state` and the optimizer state (keyed by parameter name) of a
    sharded ``model``, full, on the main process ({} elsewhere; every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = full_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_full_options())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return ({n: full[n].contiguous() for n in names} if full else {}), optimizer_state


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor], optimizer_state: dict) -> None:
    """Give every process its shards of full trainable weights ``tensors`` and optimizer
    state (as :func:`gathered_trainable_state` wrote them)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    missing = sorted(set(tensors) - {n for n, _ in model.named_parameters()})
    if missing:
        raise ValueError(f"checkpoint holds parameters the model lacks: {missing[:3]}")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
