"""Check our ALM loss against tokenkit's, ALM's reference implementation (JAX), on one batch.

Boundary: builds one synthetic batch (seeded random texts, two random byte-level
tokenizations, random teacher and student logits), runs both implementations on it and
compares; trains nothing and loads no model. tokenkit is used from a copy of its source
(GitHub: bminixhofer/tokenkit) given by ``--tokenkit-src DIR`` or ``$TOKENKIT_SRC``; nothing
of it is copied here.

Each side builds its own alignment from the same tokens: ours is ``align_chunks`` on the
tokens' byte lengths, tokenkit's is ``align.get_unconstrained_alignments`` on the same tokens
as byte-level strings (its "unconstrained" chunks; ours has no counterpart of its
``unbiased`` / ``space`` chunk kinds). Both are checked to cut the text into the same chunks,
and the boundary set (``distill.trainer.boundary_ids``) to equal tokenkit's default space
mask (``space+tab+newline+special``). Then ``training.losses.compute_alm_loss`` is called
directly, with the batch dictionary, the log-probs and the space masks it reads (the trainer
state is not needed), and compared with our registered ``alm`` loss divided by its unit
count, as the trainer normalises it:

- value: ours + the teacher's mean binary entropy against tokenkit's ``binary_ce`` (our loss
  is the binary KL: the cross-entropy minus that constant, which has no gradient);
- gradient with respect to the student's log-probs taken as free variables (tokenkit's
  ``student_logprobs``, with ``student_probs = exp(student_logprobs)``), and with respect to
  the student's logits (through our fused per-position statistics).

Options map as: ``tau`` = ``binarization_temp``; ``debias`` = ``append_space`` in
``alm_mode``; ``theta`` = ``merge_by_space_prob`` with ``tokenizer_pair_bias_threshold =
theta`` (theta 0: not merged); ``alm_units probability`` = ``alm_diff_fn binary_ce`` and
``nats`` = the same with a loss weight of tau (tokenkit's ``loss_weights``); units per
chunk, ``distill_main_path_numerator`` / ``_denominator`` = ``chunk_count``.

Where the two differ by design, the difference is measured rather than hidden:

- tokenkit's mean divides by a miscount when it merges chunks (:func:`tokenkit_divisor`),
  so the check compares tokenkit's summed loss divided by our unit count, and reports its
  mean as returned too;
- tokenkit subtracts ``epsilon`` (1e-6) from every L / tau; the check passes
  ``epsilon=0`` (a parameter of ``compute_alm_loss``) and reports the default as well;
- a student without BOS: tokenkit scores each row's first chunk without the student's
  first token (never predicted), ours drops that chunk; reported, not checked.

    python bench/tokenkit_check.py --tokenkit-src DIR

needs ``jax``, ``flax``, ``optax``, ``editdistance`` and ``wandb`` importable beside
tokensurgeon (tokenkit's losses module imports them). Prints a table; the last stdout line is
one JSON object with the largest absolute difference per configuration (exit code 1 when
they do not agree); raw results go to ``bench/results/distill/tokenkit_check.json``. ``tests/distill/test_tokenkit_check.py``
(slow tier) runs the same comparison (:func:`compare`, judged by :func:`failures`).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# Before bench/ itself: bench/distill.py must not shadow the distill package.
sys.path.insert(0, str(ROOT))

from distill.alignment import NO_CHUNK, align_chunks, token_byte_lengths
from distill.losses import (
    LOSSES,
    AlmOptions,
    LossInputs,
    Side,
    alm_chunk_logliks,
    alm_scale,
    log1mexp,
    loss_settings,
)
from distill.trainer import boundary_ids
from tokensurgeon.errors import UsageError

SRC_ENV = "TOKENKIT_SRC"
RESULTS = ROOT / "bench" / "results" / "distill" / "tokenkit_check.json"
TOLERANCE = 1e-4
# tokenkit's default space_mask_mode (scripts/cross_tokenizer_distill.py).
SPACE_MASK_MODE = "space+tab+newline+special"
# The modules tokenkit's losses module needs at import time.
NEEDS = ("jax", "flax", "optax", "editdistance", "wandb", "scipy")


@dataclass(frozen=True)
class AlmCase:
    """One configuration of our ``alm`` loss (the fields of :class:`AlmOptions`)."""

    alm_units: str
    tau: float
    theta: float
    debias: bool

    @property
    def name(self) -> str:
        return (f"{self.alm_units} tau={self.tau:g} theta={self.theta:g} "
                f"debias={'on' if self.debias else 'off'}")

    def tokenkit_args(self) -> SimpleNamespace:
        """The ``args`` fields ``compute_alm_loss`` reads, for the same configuration."""
        modes = (["merge_by_space_prob"] if self.theta > 0 else []) + (
            ["append_space"] if self.debias else [])
        return SimpleNamespace(
            alm_diff_fn="binary_ce", binarization_temp=self.tau, alm_mode="+".join(modes),
            tokenizer_pair_bias_threshold=self.theta, distill_chunk_sizes=[1],
            distill_main_path_numerator="chunk_count",
            distill_main_path_denominator="chunk_count")


CASES = tuple(AlmCase(u, t, th, d) for u, t, th, d in itertools.product(
    ("probability", "nats"), (1.0, 100.0), (0.0, 0.1), (False, True)))


# ---------------------------------------------------------------------------- tokenkit source


def tokenkit_source(arg: str | None) -> Path | None:
    """The tokenkit source folder from ``--tokenkit-src`` or ``$TOKENKIT_SRC`` (None: unset)."""
    value = arg or os.environ.get(SRC_ENV)
    return Path(value) if value else None


def unavailable(src: Path | None) -> str | None:
    """Why the check cannot run (one line naming the fix), or None when it can."""
    if src is None:
        return (f"needs tokenkit's source: pass --tokenkit-src DIR or set ${SRC_ENV} to a copy "
                "of GitHub's bminixhofer/tokenkit (the folder that holds tokenkit/)")
    if not (src / "tokenkit" / "training" / "losses.py").is_file():
        return f"{src} holds no tokenkit/training/losses.py; point at a copy of bminixhofer/tokenkit"
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return (f"tokenkit's losses need {', '.join(missing)}: pip install "
                f"{' '.join(missing)} (jax on CPU is enough)")
    return None


def load_tokenkit(src: Path) -> SimpleNamespace:
    """tokenkit's ``training.losses``, ``align``, ``utils`` and ``constants`` from ``src``."""
    if str(src) not in sys.path:
        sys.path.append(str(src))
    mods = {name: importlib.import_module(f"tokenkit.{name}")
            for name in ("training.losses", "align", "utils", "constants")}
    return SimpleNamespace(losses=mods["training.losses"], align=mods["align"],
                           utils=mods["utils"], constants=mods["constants"])


def source_commit(src: Path, given: str | None) -> str:
    """The tokenkit commit: ``given``, else ``git rev-parse`` when ``src`` is a checkout."""
    if given:
        return given
    out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() if out.returncode == 0 else "unknown"


# ---------------------------------------------------------------------------- the batch

BOS, PAD = 0, 1
SPECIALS = ("<s>", "<pad>")


@dataclass
class Batch:
    """One batch of both sides (``t_`` teacher, ``s_`` student).

    ids, mask: [B, T] int64 / bool; logits: [B, T, V] float32; token_bytes: per vocabulary
    id, None for the specials (BOS 0, PAD 1); chunk_ids: [B, T] ours (-1: no chunk).
    """

    t_ids: np.ndarray
    s_ids: np.ndarray
    t_mask: np.ndarray
    s_mask: np.ndarray
    t_logits: np.ndarray
    s_logits: np.ndarray
    t_bytes: tuple
    s_bytes: tuple
    t_chunks: np.ndarray
    s_chunks: np.ndarray
    num_chunks: int
    student_bos: bool


def _segment(data: bytes, rng: np.random.Generator, longest: int) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        n = int(rng.integers(1, longest + 1))
        pieces.append(data[at: at + n])
        at += n
    return pieces


def make_batch(seed: int = 0, rows: int = 3, student_bos: bool = True,
               logit_scale: float = 3.0) -> Batch:
    """Random texts (words of ASCII and 2-byte letters, spaces, newlines, tabs), each cut
    into random byte pieces on each side (1-4 bytes teacher, 1-6 student; a piece may split a
    character); rows of different lengths, right-padded; BOS first on the teacher, and on
    the student when ``student_bos``."""
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["é", "ß", "ø"]
    texts = []
    for r in range(rows):
        words = ["".join(rng.choice(letters, int(rng.integers(1, 7)))) for _ in range(8 + 3 * r)]
        seps = rng.choice([" ", " ", " ", "\n", "\t", ", "], len(words) - 1)
        texts.append((words[0] + "".join(s + w for s, w in zip(seps, words[1:]))).encode())

    def side(longest: int, bos: bool, extra: int):
        pieces = [_segment(t, rng, longest) for t in texts]
        vocab = list(SPECIALS) + sorted({p for row in pieces for p in row})
        # Tokens that never occur, a few starting with a space, so the boundary set and the
        # distributions are not only the realised tokens.
        vocab += [bytes([32 if i % 4 == 0 else 97 + i % 26]) + b"zq" * (1 + i % 3)
                  for i in range(extra)]
        index = {p: i for i, p in enumerate(vocab)}
        rows_ids = [([BOS] if bos else []) + [index[p] for p in row] for row in pieces]
        width = max(map(len, rows_ids))
        ids = np.full((rows, width), PAD, dtype=np.int64)
        mask = np.zeros((rows, width), dtype=bool)
        for b, row in enumerate(rows_ids):
            ids[b, : len(row)] = row
            mask[b, : len(row)] = True
        token_bytes = (None, None) + tuple(vocab[2:])
        logits = (rng.standard_normal((rows, width, len(vocab))) * logit_scale).astype(np.float32)
        return ids, mask, token_bytes, logits

    t_ids, t_mask, t_bytes, t_logits = side(4, True, 24)
    s_ids, s_mask, s_bytes, s_logits = side(6, student_bos, 17)
    t_chunks = np.full(t_ids.shape, NO_CHUNK, dtype=np.int64)
    s_chunks = np.full(s_ids.shape, NO_CHUNK, dtype=np.int64)
    num_chunks = 0
    for b in range(rows):
        tl, sl = int(t_mask[b].sum()), int(s_mask[b].sum())
        al = align_chunks(token_byte_lengths(t_ids[b, :tl].tolist(), t_bytes),
                          token_byte_lengths(s_ids[b, :sl].tolist(), s_bytes))
        t_chunks[b, :tl], s_chunks[b, :sl] = al.chunk_a, al.chunk_b
        num_chunks = max(num_chunks, al.num_chunks)
    return Batch(t_ids, s_ids, t_mask, s_mask, t_logits, s_logits, t_bytes, s_bytes,
                 t_chunks, s_chunks, num_chunks, student_bos)


class TokenkitVocab:
    """The part of a tokenizer that tokenkit's alignment and space mask read: byte-level
    token strings, special ids, and the model kind's BOS replacement."""

    def __init__(self, token_bytes: tuple, bytes_to_chars: dict, bos: bool):
        self.tokens = list(SPECIALS) + ["".join(bytes_to_chars[c] for c in b)
                                        for b in token_bytes[len(SPECIALS):]]
        self.all_special_ids = [BOS, PAD]
        self.model_kind_cls = SimpleNamespace(
            replacements={"<|<bos>|>": [SPECIALS[BOS]] if bos else None})

    def __len__(self) -> int:
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def _text_chunks(chunk_of: np.ndarray, token_bytes: tuple, ids: np.ndarray) -> list[list]:
    """Per row, each chunk's token positions in order, keeping chunks that hold text bytes."""
    out = []
    for b in range(chunk_of.shape[0]):
        groups: dict[int, list[int]] = {}
        for t, c in enumerate(chunk_of[b].tolist()):
            if c >= 0 and token_bytes[int(ids[b, t])]:
                groups.setdefault(c, []).append(t)
        out.append([groups[c] for c in sorted(groups)])
    return out


def _matrix_chunks(matrix: np.ndarray) -> np.ndarray:
    """[B, T] chunk column of each token in an alignment matrix [B, T, K] (-1: none)."""
    return np.where(matrix.any(-1), matrix.argmax(-1), NO_CHUNK)


# ---------------------------------------------------------------------------- the two losses


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, -1)


def _stats(logprobs: torch.Tensor, ids: torch.Tensor, boundary: torch.Tensor):
    """(realised [B, T], boundary [B, T]) from free log-probs [B, T, V], as
    :meth:`LossInputs.stats` gives them: realised[t] = lp[t - 1, ids[t]] (0 at t = 0),
    boundary[t] = log sum over the boundary set of exp(lp[t])."""
    nxt = logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    realised = torch.cat([torch.zeros_like(nxt[:, :1]), nxt], dim=1)
    return realised, torch.logsumexp(logprobs[..., boundary], -1)


def ours(batch: Batch, case: AlmCase, wrt: str, tau_factor: float = 1.0) -> dict:
    """Our ``alm`` loss / its unit count, its gradient with respect to the student's
    log-probs (``wrt="logprobs"``) or logits (``"logits"``), and the teacher's mean binary
    entropy over the same chunks (the constant between binary KL and binary CE)."""
    opts = AlmOptions(tau=case.tau * tau_factor, alm_units=case.alm_units, theta=case.theta,
                      debias=case.debias)
    settings = loss_settings(opts, ["alm"])
    t_boundary = boundary_ids(batch.t_bytes)
    s_boundary = boundary_ids(batch.s_bytes)
    t_ids, s_ids = torch.from_numpy(batch.t_ids), torch.from_numpy(batch.s_ids)
    t_logits = torch.from_numpy(batch.t_logits)
    s_logits = torch.from_numpy(batch.s_logits)
    free = (_log_probs(s_logits) if wrt == "logprobs" else s_logits).clone().requires_grad_(True)

    def identity_head(v: int) -> torch.nn.Module:
        head = torch.nn.Linear(v, v, bias=False)
        head.weight.data = torch.eye(v)
        head.requires_grad_(False)
        return head

    hidden = wrt == "logits"
    teacher = Side(t_ids, torch.from_numpy(batch.t_mask), torch.from_numpy(batch.t_chunks),
                   t_logits if hidden else None, identity_head(t_logits.shape[-1]), t_boundary)
    student = Side(s_ids, torch.from_numpy(batch.s_mask), torch.from_numpy(batch.s_chunks),
                   free if hidden else None, identity_head(s_logits.shape[-1]), s_boundary)
    x = LossInputs(student=student, teacher=teacher, num_chunks=batch.num_chunks,
                   settings=settings)
    if not hidden:
        t_real, t_bound = _stats(_log_probs(t_logits), t_ids, t_boundary)
        x.set_teacher_stats(list(zip(t_real, t_bound)))
        # The student's statistics as LossInputs.stats would compute them, but from free
        # log-probs, so the gradient is taken with respect to those.
        x._cache["student"] = _stats(free, s_ids, s_boundary)
    alm = LOSSES["alm"]
    count = alm.count(x)
    loss = alm.total(x) / count
    loss.backward()
    with torch.no_grad():
        groups = x.groups()
        t_ll, t_ok = alm_chunk_logliks(*x.stats("teacher"), teacher.predicted, teacher.chunk_ids,
                                       groups, case.debias)
        _, s_ok = alm_chunk_logliks(*x.stats("student"), student.predicted, student.chunk_ids,
                                    groups, case.debias)
        a = (t_ll / opts.tau).clamp(max=-1e-7)
        entropy = -(a.exp() * a + (1 - a.exp()) * log1mexp(a))
        entropy = torch.where(t_ok & s_ok, entropy, torch.zeros_like(entropy)).sum() / count
    return {"value": float(loss.detach()), "grad": free.grad.numpy(), "chunks": count,
            "entropy": float(entropy) * alm_scale(case.alm_units, opts.tau),
            "groups": int(groups.max()) + 1 if groups.numel() else 0}


def tokenkit_divisor(teacher_matrix: np.ndarray, teacher_mask: np.ndarray,
                     teacher_space_logp: np.ndarray, theta: float) -> int:
    """The number tokenkit divides the summed ALM loss by (``chunk_count`` numerator and
    denominator): its chunks that hold a predicted teacher token; when it merges chunks
    (``merge_by_space_prob``), not the number of groups but a miscount. It merges the
    per-chunk token counts into per-group counts with its merge matrix (training/losses.py,
    line 487) and then, for the global counts, multiplies those already merged counts by the
    merge matrix a second time (line 488) and counts the nonzero entries.

    Args:
        teacher_matrix: [B, T, K] tokenkit's teacher alignment matrix.
        teacher_mask: [B, T] its loss mask.
        teacher_space_logp: [B, T] the teacher's log p(boundary set | <= t).
        theta: the merge threshold (0: no merging).
    """
    m = teacher_matrix & teacher_mask[:, :, None]
    count = m[:, 1:].sum(1)  # [B, K]: chunk k's tokens that are predicted
    if theta <= 0:
        return int((count > 0).sum())
    # A chunk's last token (0 for an empty column), its boundary probability, its group.
    last_only = m.copy()
    last_only[:, :-1] &= ~m[:, 1:]
    last = last_only.argmax(1)
    closes = np.exp(np.take_along_axis(teacher_space_logp, last, 1)) > theta
    group = np.cumsum(closes, 1) - closes
    merge = np.zeros(m.shape[:1] + (m.shape[2],) * 2)  # [B, K chunks, K groups]
    np.put_along_axis(merge, group[:, :, None], (count > 0)[:, :, None], 2)
    merged = np.einsum("bk,bkg->bg", count, merge)
    twice = np.einsum("bk,bkg->bg", merged, merge)
    return int((twice > 0).sum())


def theirs(tk: SimpleNamespace, batch: Batch, case: AlmCase, wrt: str,
           epsilon: float | None = None) -> dict:
    """tokenkit's ``compute_alm_loss("unconstrained", ...)`` on the batch (times tau for
    ``nats``), its gradient as in :func:`ours`, with tokenkit's own alignment matrices and
    space masks, and the number it divides the summed loss by (:func:`tokenkit_divisor`)."""
    import jax
    import jax.numpy as jnp

    t_vocab = TokenkitVocab(batch.t_bytes, tk.constants.BYTES_TO_CHARS, bos=True)
    s_vocab = TokenkitVocab(batch.s_bytes, tk.constants.BYTES_TO_CHARS, bos=batch.student_bos)
    a_student, b_teacher = tk.align.get_unconstrained_alignments(
        batch.t_ids, batch.s_ids, batch.t_mask, batch.s_mask, tokenizer_teacher=t_vocab,
        tokenizer_student=s_vocab)
    data = {"input_ids_original": jnp.asarray(batch.t_ids, dtype=jnp.int32),
            "input_ids_new": jnp.asarray(batch.s_ids, dtype=jnp.int32),
            "alignment_matrix_a_unconstrained": jnp.asarray(a_student),
            "alignment_matrix_b_unconstrained": jnp.asarray(b_teacher),
            "loss_mask_original": jnp.asarray(batch.t_mask),
            "loss_mask_new": jnp.asarray(batch.s_mask)}
    space_t = tk.utils.get_space_mask(t_vocab, SPACE_MASK_MODE)
    space_s = tk.utils.get_space_mask(s_vocab, SPACE_MASK_MODE)
    t_logprobs = jax.nn.log_softmax(jnp.asarray(batch.t_logits), -1)
    weight = alm_scale(case.alm_units, case.tau)
    extra = {} if epsilon is None else {"epsilon": epsilon}

    def loss(free):
        s_logprobs = free if wrt == "logprobs" else jax.nn.log_softmax(free, -1)
        loss_args = tk.losses.LossArgs(
            params=None, batch=data, global_batch=data, teacher_config=None, new_config=None,
            teacher_out=None, student_out=None, tokenizer_teacher=None, tokenizer_new=None,
            teacher_probs=jnp.exp(t_logprobs), teacher_logprobs=t_logprobs, teacher_logits=None,
            student_probs=jnp.exp(s_logprobs), student_logprobs=s_logprobs, student_logits=None,
            predicted_embeddings=None, scalar_report={}, space_mask_teacher=jnp.asarray(space_t),
            space_mask_new=jnp.asarray(space_s), logit_mask_teacher=None, logit_mask_new=None)
        return weight * tk.losses.compute_alm_loss("unconstrained", case.tokenkit_args(),
                                                   loss_args, **extra)

    start = jax.nn.log_softmax(jnp.asarray(batch.s_logits), -1) if wrt == "logprobs" \
        else jnp.asarray(batch.s_logits)
    value, grad = jax.value_and_grad(loss)(start)
    space_logp = np.log(np.exp(np.asarray(t_logprobs, dtype=np.float64)) @ space_t)
    return {"value": float(value), "grad": np.asarray(grad),
            "divisor": tokenkit_divisor(b_teacher, batch.t_mask, space_logp, case.theta)}


# ---------------------------------------------------------------------------- the comparison


def check_alignment(tk: SimpleNamespace, batch: Batch) -> dict:
    """Whether both sides cut the batch into the same chunks and use the same boundary set."""
    t_vocab = TokenkitVocab(batch.t_bytes, tk.constants.BYTES_TO_CHARS, bos=True)
    s_vocab = TokenkitVocab(batch.s_bytes, tk.constants.BYTES_TO_CHARS, bos=batch.student_bos)
    a_student, b_teacher = tk.align.get_unconstrained_alignments(
        batch.t_ids, batch.s_ids, batch.t_mask, batch.s_mask, tokenizer_teacher=t_vocab,
        tokenizer_student=s_vocab)
    same_chunks = (
        _text_chunks(batch.t_chunks, batch.t_bytes, batch.t_ids)
        == _text_chunks(_matrix_chunks(b_teacher), batch.t_bytes, batch.t_ids)
        and _text_chunks(batch.s_chunks, batch.s_bytes, batch.s_ids)
        == _text_chunks(_matrix_chunks(a_student), batch.s_bytes, batch.s_ids))
    same_boundary = all(
        set(np.flatnonzero(tk.utils.get_space_mask(v, SPACE_MASK_MODE)).tolist())
        == set(boundary_ids(tb).tolist())
        for v, tb in ((t_vocab, batch.t_bytes), (s_vocab, batch.s_bytes)))
    return {"same_chunks": bool(same_chunks), "same_boundary_set": bool(same_boundary),
            "max_chunks_per_row": batch.num_chunks}


def compare(src: Path, cases=CASES, seed: int = 0, tau_factor: float = 1.0,
            student_bos: bool = True, epsilon: float | None = 0.0) -> dict:
    """Run both losses on one batch for every case.

    Args:
        src: tokenkit's source folder.
        cases: the configurations.
        seed: the batch's seed.
        tau_factor: multiplies our tau only (1: the check; otherwise a deliberately wrong
            loss, which the check must catch).
        student_bos: the student's rows start with BOS (as the teacher's do).
        epsilon: tokenkit's ``epsilon`` (None: its default, 1e-6, which it subtracts from
            every L / tau; 0: the formula without that guard).
    Returns:
        ``{"alignment", "cases": {name: {...}}, "max_abs_diff": {name: ...},
        "max_abs_diff_same_divisor": {name: ...}}``: absolute differences of the value and
        of both gradients, as each implementation normalises (tokenkit divides by
        ``tokenkit_divisor``, we by our unit count) and with tokenkit's mean rescaled to our
        unit count (``same_divisor``: the summed losses compared).
    """
    tk = load_tokenkit(src)
    batch = make_batch(seed, student_bos=student_bos)
    out = {"alignment": check_alignment(tk, batch), "cases": {}, "max_abs_diff": {},
           "max_abs_diff_same_divisor": {}}
    for case in cases:
        row = {}
        for wrt in ("logprobs", "logits"):
            a = ours(batch, case, wrt, tau_factor)
            b = theirs(tk, batch, case, wrt, epsilon)
            to_ours = b["divisor"] / a["chunks"]
            row[f"grad_{wrt}"] = float(np.abs(a["grad"] - b["grad"]).max())
            row[f"grad_{wrt}_same_divisor"] = float(np.abs(a["grad"] - b["grad"] * to_ours).max())
            row[f"grad_{wrt}_scale"] = float(np.abs(a["grad"]).max())
        ours_ce = a["value"] + a["entropy"]
        row.update(value=abs(ours_ce - b["value"]),
                   value_same_divisor=abs(ours_ce - b["value"] * to_ours),
                   ours=a["value"], ours_plus_entropy=ours_ce, tokenkit=b["value"],
                   units=a["chunks"], tokenkit_divisor=b["divisor"], groups=a["groups"])
        out["cases"][case.name] = row
        out["max_abs_diff"][case.name] = max(row[k] for k in DIFFS)
        out["max_abs_diff_same_divisor"][case.name] = max(row[k + "_same_divisor"]
                                                          for k in DIFFS)
    return out


DIFFS = ("value", "grad_logprobs", "grad_logits")


def failures(result: dict, tolerance: float = TOLERANCE) -> list[str]:
    """What keeps a :func:`compare` result from agreeing, one line each (empty: agrees):
    the alignments or boundary sets differ; a summed loss or its gradient differs by more
    than ``tolerance`` (a gradient also by more than ``tolerance`` times its largest
    entry); or tokenkit divides by another number than our unit count where it
    does not merge chunks (where it merges, it miscounts: :func:`tokenkit_divisor`)."""
    out = [f"alignment: {k} is False" for k, v in result["alignment"].items() if v is False]
    for name, row in result["cases"].items():
        out += [f"{name}: |d {k}| {row[k + '_same_divisor']:.2e} > {tolerance:g}"
                for k in DIFFS if not row[k + "_same_divisor"] <= tolerance]
        # Gradients are small in probability units: also within tolerance of their scale.
        out += [f"{name}: |d {k}| {row[k + '_same_divisor']:.2e} > {tolerance:g} x "
                f"{row[k + '_scale']:.2e}" for k in DIFFS[1:]
                if not row[k + "_same_divisor"] <= tolerance * row[k + "_scale"]]
        if " theta=0 " in name and row["tokenkit_divisor"] != row["units"]:
            out.append(f"{name}: tokenkit divides by {row['tokenkit_divisor']}, "
                       f"we by {row['units']}")
    return out


# ---------------------------------------------------------------------------- CLI


def main() -> None:
    from common import load_average, portable  # bench/ is the script's folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenkit-src", default=None, metavar="DIR",
                        help=f"a copy of tokenkit's source (default: ${SRC_ENV})")
    parser.add_argument("--tokenkit-commit", default=None,
                        help="the commit of that copy, recorded in the results (default: "
                             "git rev-parse in DIR when it is a checkout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau-factor", type=float, default=1.0,
                        help="multiply our tau only: a deliberately wrong loss, to see the "
                             "check fail")
    args = parser.parse_args()
    src = tokenkit_source(args.tokenkit_src)
    reason = unavailable(src)
    if reason:
        print(f"bench/tokenkit_check.py: {reason}")
        raise SystemExit(2)
    if args.tau_factor <= 0:
        raise UsageError("--tau-factor must be > 0")
    t0 = time.perf_counter()
    load_start = load_average()
    run = {"check": compare(src, seed=args.seed, tau_factor=args.tau_factor),
           "default_epsilon": compare(src, seed=args.seed, tau_factor=args.tau_factor,
                                      epsilon=None),
           "student_without_bos": compare(src, seed=args.seed, tau_factor=args.tau_factor,
                                          student_bos=False)}
    import jax

    check = run["check"]
    print(f"{'configuration':40s} {'units':>5s} {'tk div':>6s} {'|dvalue|':>9s} "
          f"{'|dgrad lp|':>10s} {'|dgrad z|':>10s} {'grad scale':>10s} {'as tk':>9s} "
          f"{'tk eps':>9s} {'no BOS':>9s}")
    for name, row in check["cases"].items():
        print(f"{name:40s} {row['units']:5d} {row['tokenkit_divisor']:6d} "
              f"{row['value_same_divisor']:9.2e} {row['grad_logprobs_same_divisor']:10.2e} "
              f"{row['grad_logits_same_divisor']:10.2e} {row['grad_logprobs_scale']:10.2e} "
              f"{check['max_abs_diff'][name]:9.2e} "
              f"{run['default_epsilon']['max_abs_diff_same_divisor'][name]:9.2e} "
              f"{run['student_without_bos']['max_abs_diff_same_divisor'][name]:9.2e}")
    problems = failures(check)
    print("|d...|: tokenkit's summed loss over our unit count; as tk: tokenkit's mean as "
          "it returns it; tk eps: with tokenkit's epsilon 1e-6; no BOS: the student without BOS")
    print(f"alignment {check['alignment']}; "
          + ("agrees within " + f"{TOLERANCE:g}" if not problems else "; ".join(problems)))
    result = {
        "tokenkit_commit": source_commit(src, args.tokenkit_commit),
        "tolerance": TOLERANCE, "agrees": not problems, "problems": problems,
        "seed": args.seed, "tau_factor": args.tau_factor,
        **{name: r for name, r in run.items()},
        "versions": {"torch": torch.__version__, "jax": jax.__version__},
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average": [load_start, load_average()],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(portable(result), indent=1) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps({
        "agrees": not problems, "tokenkit_commit": result["tokenkit_commit"],
        "max_abs_diff_same_divisor": check["max_abs_diff_same_divisor"],
        "max_abs_diff_as_tokenkit_returns": check["max_abs_diff"],
        "max_abs_diff_tokenkit_epsilon": run["default_epsilon"]["max_abs_diff_same_divisor"],
        "max_abs_diff_student_without_bos":
            run["student_without_bos"]["max_abs_diff_same_divisor"]}))
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    from common import run

    run(main, "bench/tokenkit_check.py")
