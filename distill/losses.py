"""Distillation losses: pure tensor functions plus a small registry the trainer uses.

Boundary: no models are run here except through the hidden states and heads handed in via
:class:`LossInputs`; no I/O. Every registered loss returns a *sum* over its units (ALM
chunks, aligned positions or tokens) together with how it counts units; the trainer divides
by the unit count of the whole accumulated batch on all processes, so the loss and its
gradient do not depend on how the batch is split.

ALM (Minixhofer et al., 2025), per aligned chunk:
- L = sum of log p(token | prefix) over the chunk's tokens on each side;
- debiasing adds log p(boundary set | chunk end) on each side (``append space``);
- consecutive chunks are merged until the teacher's boundary probability exceeds theta;
- the distance is the binarised cross-entropy between p_T = exp(L_T / tau) and
  p_S = exp(L_S / tau), minus the teacher's binary entropy. That constant (no gradient)
  makes the loss a binary KL: 0 at student == teacher and >= 0 everywhere, with exactly
  the gradients of the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokensurgeon.config import member_options
from tokensurgeon.errors import UsageError
from tokensurgeon.logits import (
    LOGIT_CHUNK,
    checkpointed_position_statistics,
    head_logits,
    map_logit_chunks,
    position_statistics,
)
from tokensurgeon.registry import Registry

# ---------------------------------------------------------------------------- pure math


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binarised_kl(teacher_loglik: torch.Tensor, student_loglik: torch.Tensor,
                 tau: float) -> torch.Tensor:
    """ALM distance per chunk: binary CE of Bernoulli(exp(L_S/tau)) under
    Bernoulli(exp(L_T/tau)) minus the teacher's binary entropy.

    Args:
        teacher_loglik: [...] chunk log-likelihoods L_T (<= 0), no gradient needed.
        student_loglik: [...] chunk log-likelihoods L_S (<= 0).
        tau: temperature; larger keeps exp(L/tau) away from 0 for long chunks.
    Returns:
        [...] distances, >= 0 (up to rounding), 0 where L_S == L_T.
    """
    # Clamp strictly below 0 so log(1 - exp(.)) stays finite for a chunk of probability 1.
    a = (teacher_loglik / tau).clamp(max=-1e-7)
    b = (student_loglik / tau).clamp(max=-1e-7)
    p = torch.exp(a)
    return p * (a - b) + (1 - p) * (log1mexp(a) - log1mexp(b))


def chunk_sums(values: torch.Tensor, chunk_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Sum ``values`` per chunk.

    Args:
        values: [B, T] per-token values.
        chunk_ids: [B, T] chunk index of each token, -1 for tokens in no chunk.
        num_slots: K, the number of chunk slots per row.
    Returns:
        [B, K] sums (0 for empty slots).
    """
    keep = chunk_ids >= 0
    index = torch.where(keep, chunk_ids, torch.zeros_like(chunk_ids))
    out = torch.zeros(values.shape[0], num_slots, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, index, torch.where(keep, values, torch.zeros_like(values)))


def chunk_last_positions(chunk_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, K] position of each chunk's last token (-1 for empty slots), from [B, T] ids."""
    positions = torch.arange(chunk_ids.shape[1], device=chunk_ids.device).expand_as(chunk_ids)
    keep = chunk_ids >= 0
    index = torch.where(keep, chunk_ids, torch.zeros_like(chunk_ids))
    out = torch.full((chunk_ids.shape[0], num_slots), -1, dtype=torch.long, device=chunk_ids.device)
    return out.scatter_reduce(1, index, torch.where(keep, positions, torch.full_like(positions, -1)),
                              reduce="amax")


def chunk_complete(predicted: torch.Tensor, chunk_ids: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[B, K] True where a chunk has tokens and all of them are predicted ([B, T] bool)."""
    has = chunk_sums(torch.ones_like(chunk_ids, dtype=torch.float32), chunk_ids, num_slots)
    missing = chunk_sums((~predicted).float(), chunk_ids, num_slots)
    return (has > 0) & (missing == 0)


def merge_groups(teacher_boundary_logp_at_end: torch.Tensor, exists: torch.Tensor,
                 theta: float) -> torch.Tensor:
    """Group consecutive chunks: a group closes after a chunk whose teacher boundary
    probability exceeds ``theta`` (and after the row's last chunk).

    Args:
        teacher_boundary_logp_at_end: [B, K] teacher log p(boundary set) at each chunk end.
        exists: [B, K] bool, slots that hold a chunk (a prefix of each row).
        theta: boundary probability threshold; 0 keeps every chunk on its own.
    Returns:
        [B, K] group index of each chunk slot (-1 for empty slots).
    """
    closes = (teacher_boundary_logp_at_end.exp() > theta) | ~exists
    closes[:, -1] = True
    opened_before = torch.cumsum(closes.long(), dim=1) - closes.long()
    return torch.where(exists, opened_before, torch.full_like(opened_before, -1))


def alm_chunk_logliks(realised: torch.Tensor, boundary: torch.Tensor, predicted: torch.Tensor,
                      chunk_ids: torch.Tensor, groups: torch.Tensor,
                      debias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk (group) log-likelihoods of one side.

    Args:
        realised: [B, T] log p(token t | tokens < t); any value where not ``predicted``.
        boundary: [B, T] log p(boundary set | tokens <= t), read unshifted at t.
        predicted: [B, T] bool, token t is a real token with a prefix (t >= 1, not padding).
        chunk_ids: [B, T] chunk of each token (-1 none).
        groups: [B, K] group of each chunk slot (see :func:`merge_groups`, -1 none).
        debias: add the boundary log-prob at the group's last token.
    Returns:
        ``(loglik [B, K], complete [B, K] bool)`` per group slot.
    """
    k = groups.shape[1]
    token_group = torch.where(chunk_ids >= 0, groups.gather(1, chunk_ids.clamp(min=0)),
                              torch.full_like(chunk_ids, -1))
    loglik = chunk_sums(torch.where(predicted, realised, torch.zeros_like(realised)),
                        token_group, k)
    complete = chunk_complete(predicted, token_group, k)
    if debias:
        last = chunk_last_positions(token_group, k)
        loglik = loglik + torch.where(last >= 0, boundary.gather(1, last.clamp(min=0)),
                                      torch.zeros_like(loglik))
    return loglik, complete


def sorted_probability_l1(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """ULD distance: L1 between descending-sorted probability vectors.

    Args:
        student_logits: [..., Vs]; teacher_logits: [..., Vt] (the shorter is zero-padded).
    Returns:
        [...] distances in [0, 2].
    """
    ps = torch.softmax(student_logits.float(), -1).sort(-1, descending=True).values
    pt = torch.softmax(teacher_logits.float(), -1).sort(-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps = torch.nn.functional.pad(ps, (0, width - ps.shape[-1]))
    pt = torch.nn.functional.pad(pt, (0, width - pt.shape[-1]))
    return (ps - pt).abs().sum(-1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             reverse: bool) -> torch.Tensor:
    """Same-vocabulary KL per position: KL(p_T || p_S), or KL(p_S || p_T) when ``reverse``.

    Args:
        student_logits, teacher_logits: [..., V] on the same vocabulary.
    Returns:
        [...] KL in nats.
    """
    ls = torch.log_softmax(student_logits.float(), -1)
    lt = torch.log_softmax(teacher_logits.float(), -1)
    p, lp, lq = (ls.exp(), ls, lt) if reverse else (lt.exp(), lt, ls)
    return (p * (lp - lq)).sum(-1)


# ---------------------------------------------------------------------------- registry


@dataclass
class Side:
    """One side (teacher or student) of a micro-batch.

    ids, mask, chunk_ids: [B, T]; hidden: [B, T, H] final hidden states (the student's
    carry gradient); head: the lm_head; boundary_ids: [N] ids of the boundary set;
    trained: [B, T] bool, tokens the losses score (None: every real token; chat template
    text and prompts are False).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    chunk_ids: torch.Tensor
    hidden: torch.Tensor | None
    head: torch.nn.Module
    boundary_ids: torch.Tensor
    softcap: float | None = None
    trained: torch.Tensor | None = None

    @property
    def predicted(self) -> torch.Tensor:
        """[B, T] bool: token t is real, trained, and has a prefix to be predicted from."""
        pos = torch.arange(self.ids.shape[1], device=self.ids.device)
        out = self.mask.bool() & (pos >= 1)
        return out if self.trained is None else out & self.trained


# The first is the default: in nats, alm+sft at equal weights gives ALM 0.6-0.75x sft's
# gradient; in probability units ~1% of it (an equal-weight alm+sft is sft alone).
ALM_UNITS = ("nats", "probability")


@dataclass
class AlmOptions:
    """Options of the ``alm`` loss (the single source of their defaults and help; each field
    is also a ``distill`` flag). ``alm_units``: ``probability`` is the paper's binarised KL
    at temperature tau, about 1/tau of a log-likelihood distance; ``nats`` multiplies it by
    tau (see :func:`alm_scale`)."""

    tau: float = field(default=100.0, metadata={"help": "ALM binarisation temperature"})
    alm_units: str = field(default=ALM_UNITS[0], metadata={
        "help": "ALM loss units: nats (the binarised KL times tau: comparable with sft's nats "
                "per token, so alm+sft weights compare like with like) or probability (the "
                "paper's form, about 1/tau of that: beside sft at equal weight it is ~1%% of "
                "the gradient, i.e. sft alone)", "choices": ALM_UNITS})
    theta: float = field(default=0.1, metadata={
        "help": "merge chunks until the teacher's boundary probability exceeds this (0: off)"})
    debias: bool = field(default=True, metadata={
        "help": "ALM append-space debiasing (boundary-set log-prob at chunk ends)"})

    def validate(self) -> None:
        if self.tau <= 0:
            raise UsageError("--tau must be > 0")
        if not 0 <= self.theta < 1:
            raise UsageError("--theta must be in [0, 1)")


def chunk_end_mask(chunk_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the token is the last of its chunk (from [B, T] chunk ids, -1 none)."""
    following = torch.cat([chunk_ids[:, 1:], torch.full_like(chunk_ids[:, :1], -1)], dim=1)
    return (chunk_ids >= 0) & (following != chunk_ids)


def side_statistics(side: Side, settings: LossSettings,
                    need_boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(realised [B, T], boundary [B, T])`` of one side from its hidden states:
    realised[t] = log p(token t | < t) (0 at t = 0 and where not predicted), boundary[t] =
    log p(boundary set | <= t), computed at chunk ends only (0 elsewhere) when
    ``need_boundary`` (all 0 otherwise). Gradients flow when ``side.hidden`` has them."""
    s = settings
    next_ids = torch.cat([side.ids[:, 1:], side.ids[:, :1]], dim=1)
    if s.fused:
        predicted_next = torch.cat([side.predicted[:, 1:],
                                    torch.zeros_like(side.predicted[:, :1])], dim=1)
        ends = chunk_end_mask(side.chunk_ids) & side.mask.bool()
        rows = predicted_next | ends if need_boundary else predicted_next
        nxt, boundary = position_statistics(
            side.hidden, side.head, next_ids, side.boundary_ids if need_boundary else None,
            s.logit_chunk, side.softcap, need_boundary=ends, rows=rows)
    else:
        nxt, boundary = checkpointed_position_statistics(
            side.hidden, side.head, next_ids, side.boundary_ids, s.logit_chunk, side.softcap,
            s.recompute)
    realised = torch.cat([torch.zeros_like(nxt[:, :1]), nxt[:, :-1]], dim=1)
    return realised, boundary


@dataclass
class LossInputs:
    """Everything a loss may read for one micro-batch; statistics are computed once."""

    student: Side
    teacher: Side
    num_chunks: int
    settings: LossSettings
    _cache: dict = field(default_factory=dict)

    def stats(self, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(realised [B, T], boundary [B, T])`` for ``who`` in {student, teacher}:
        realised[t] = log p(token t | < t) (0 at t = 0), boundary read at t."""
        if who not in self._cache:
            side: Side = getattr(self, who)
            need = who == "teacher" or self.settings.student_boundary
            grad = torch.enable_grad() if who == "student" else torch.no_grad()
            with grad:
                self._cache[who] = side_statistics(side, self.settings, need)
        return self._cache[who]

    def set_teacher_stats(self, per_example: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Serve the teacher's statistics from a cache: one ``(realised [T_b],
        boundary [T_b])`` pair per row, as :func:`side_statistics` gives them."""
        shape = self.teacher.ids.shape
        realised = torch.zeros(shape, dtype=torch.float32, device=self.teacher.ids.device)
        boundary = torch.zeros_like(realised)
        for b, (r, bd) in enumerate(per_example):
            realised[b, : r.numel()] = r.to(realised.device)
            boundary[b, : bd.numel()] = bd.to(boundary.device)
        self._cache["teacher"] = (realised, boundary)

    def groups(self) -> torch.Tensor:
        """[B, K] ALM chunk groups, merged on the teacher's boundary probability."""
        if "groups" not in self._cache:
            k = max(self.num_chunks, 1)
            _, t_boundary = self.stats("teacher")
            t_last = chunk_last_positions(self.teacher.chunk_ids, k)
            at_end = torch.where(t_last >= 0, t_boundary.gather(1, t_last.clamp(min=0)),
                                 torch.zeros_like(t_last, dtype=t_boundary.dtype))
            self._cache["groups"] = merge_groups(at_end, t_last >= 0, self.settings.theta)
        return self._cache["groups"]

    def chunk_valid(self) -> torch.Tensor:
        """[B, K] unmerged chunks complete on both sides."""
        k = max(self.num_chunks, 1)
        return (chunk_complete(self.student.predicted, self.student.chunk_ids, k)
                & chunk_complete(self.teacher.predicted, self.teacher.chunk_ids, k))


# What a loss reads of the teacher: nothing; its per-token statistics (realised-token and
# boundary-set log-probs, which the teacher cache can serve); or its hidden states, so the
# teacher runs online.
TEACHER_NEEDS = ("none", "statistics", "online")


@dataclass(frozen=True)
class Loss:
    """A registered loss: ``count`` units (no student gradient needed) and their ``total``,
    and the traits the trainer asks it about (it never tests a loss's name):

    - ``teacher``: what it reads of the teacher (one of :data:`TEACHER_NEEDS`);
    - ``student_boundary``: it reads the student's boundary-set log-probs (when debiasing);
    - ``needs_same_vocab`` / ``needs_same_hidden``: teacher and student must share them;
    - ``options``: its options dataclass, whose fields become ``distill`` flags and
      :class:`LossSettings` fields (so a loss reads them as ``x.settings.NAME``).
    """

    name: str
    count: Callable[[LossInputs], int]
    total: Callable[[LossInputs], torch.Tensor]
    teacher: str = "online"
    student_boundary: bool = False
    needs_same_vocab: bool = False
    needs_same_hidden: bool = False
    options: type | None = None

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_NEEDS:
            raise ValueError(f"loss {self.name}: teacher must be one of {TEACHER_NEEDS}")

    @property
    def cacheable(self) -> bool:
        """The teacher cache can serve everything it reads of the teacher."""
        return self.teacher != "online"


LOSSES: Registry[Loss] = Registry("loss")


def register(loss: Loss) -> Loss:
    return LOSSES.register(loss.name)(loss)


def _alm_parts(x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = x.groups()
    t_ll, t_ok = alm_chunk_logliks(*x.stats("teacher"), x.teacher.predicted,
                                   x.teacher.chunk_ids, groups, x.settings.debias)
    s_ll, s_ok = alm_chunk_logliks(*x.stats("student"), x.student.predicted,
                                   x.student.chunk_ids, groups, x.settings.debias)
    return t_ll, s_ll, t_ok & s_ok


def _alm_count(x: LossInputs) -> int:
    groups = x.groups()
    k = groups.shape[1]

    def token_group(side: Side) -> torch.Tensor:
        return torch.where(side.chunk_ids >= 0, groups.gather(1, side.chunk_ids.clamp(min=0)),
                           torch.full_like(side.chunk_ids, -1))

    ok = (chunk_complete(x.teacher.predicted, token_group(x.teacher), k)
          & chunk_complete(x.student.predicted, token_group(x.student), k))
    return int(ok.sum())


def alm_scale(units: str, tau: float) -> float:
    """Factor applied to the binarised KL: 1 for ``probability``, tau for ``nats``.

    For chunk log-likelihoods well above -tau the binarised KL is, to first order in 1/tau,
    (1/tau) * (u log(u/v) - u + v) with u = -L_T, v = -L_S: a generalised KL between the
    two chunk losses in nats, whose gradient with respect to L_S is (u/v - 1) / tau.
    Multiplied by tau it tends to that log-space distance (tokenkit's
    ``binary_kl_temp_limit``), O(1) per chunk like SFT's nats per token, so the weights of
    ``alm+sft`` compare like with like; in ``probability`` units an equal weight gives ALM
    about 1/tau of SFT's gradient.
    """
    if units not in ALM_UNITS:
        raise ValueError(f"unknown ALM units {units!r}; choose one of {', '.join(ALM_UNITS)}")
    return tau if units == "nats" else 1.0


def _alm_total(x: LossInputs) -> torch.Tensor:
    t_ll, s_ll, valid = _alm_parts(x)
    d = binarised_kl(t_ll.detach(), s_ll, x.settings.tau) * alm_scale(x.settings.alm_units,
                                                                        x.settings.tau)
    return torch.where(valid, d, torch.zeros_like(d)).sum()


def _sft_count(x: LossInputs) -> int:
    return int(x.student.predicted.sum())


def _sft_total(x: LossInputs) -> torch.Tensor:
    realised, _ = x.stats("student")
    return -torch.where(x.student.predicted, realised, torch.zeros_like(realised)).sum()


def _ends(side: Side, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at chunk ends [M, H] and the flat validity mask."""
    last = chunk_last_positions(side.chunk_ids, k)
    rows = torch.arange(last.shape[0], device=last.device).unsqueeze(1).expand_as(last)
    keep = valid & (last >= 0)
    return side.hidden[rows[keep], last[keep]], keep


def _chunk_count(x: LossInputs) -> int:
    return int(x.chunk_valid().sum())


def _hidden_total(x: LossInputs) -> torch.Tensor:
    k = max(x.num_chunks, 1)
    valid = x.chunk_valid()
    hs, _ = _ends(x.student, valid, k)
    ht, _ = _ends(x.teacher, valid, k)
    return ((hs - ht.detach()) ** 2).mean(-1).sum()


def _uld_total(x: LossInputs) -> torch.Tensor:
    k = max(x.num_chunks, 1)
    valid = x.chunk_valid()
    hs, _ = _ends(x.student, valid, k)
    ht, _ = _ends(x.teacher, valid, k)
    if hs.shape[0] == 0:
        return x.student.hidden.sum() * 0.0
    teacher, s = x.teacher, x.settings

    def distance(student_logits: torch.Tensor, teacher_hidden: torch.Tensor):
        with torch.no_grad():
            teacher_logits = head_logits(teacher_hidden, teacher.head, teacher.softcap)
        return (sorted_probability_l1(student_logits, teacher_logits),)

    (d,) = map_logit_chunks(distance, hs.unsqueeze(0), x.student.head, (ht.unsqueeze(0),),
                            s.logit_chunk, x.student.softcap, s.recompute)
    return d.sum()


def _token_count(x: LossInputs) -> int:
    return int(x.student.predicted.sum())


def _kl_total(x: LossInputs, reverse: bool) -> torch.Tensor:
    teacher, s = x.teacher, x.settings

    def distance(student_logits: torch.Tensor, teacher_hidden: torch.Tensor,
                 mask: torch.Tensor):
        with torch.no_grad():
            teacher_logits = head_logits(teacher_hidden, teacher.head, teacher.softcap)
        kl = token_kl(student_logits, teacher_logits, reverse)
        return (torch.where(mask, kl, torch.zeros_like(kl)),)

    # Position t predicts token t + 1: it counts when token t + 1 is predicted.
    target = torch.cat([x.student.predicted[:, 1:],
                        torch.zeros_like(x.student.predicted[:, :1])], dim=1)
    (kl,) = map_logit_chunks(distance, x.student.hidden, x.student.head,
                             (x.teacher.hidden, target), s.logit_chunk, x.student.softcap,
                             s.recompute)
    return kl.sum()


register(Loss("alm", _alm_count, _alm_total, teacher="statistics", student_boundary=True,
              options=AlmOptions))
register(Loss("sft", _sft_count, _sft_total, teacher="none"))
register(Loss("hidden", _chunk_count, _hidden_total, needs_same_hidden=True))
register(Loss("uld", _chunk_count, _uld_total))
register(Loss("kl", _token_count, lambda x: _kl_total(x, reverse=False), needs_same_vocab=True))
register(Loss("kl_reverse", _token_count, lambda x: _kl_total(x, reverse=True),
              needs_same_vocab=True))
# distill's --loss unless one is given.
DEFAULT_LOSS = "alm+sft"


@member_options(LOSSES, after="student_boundary")
@dataclass
class LossSettings:
    """What the losses read besides their inputs: every registered loss's options (fields
    of their options dataclasses, e.g. ``tau``), plus ``logit_chunk``; ``fused``:
    per-position statistics with the closed-form backward of
    :func:`tokensurgeon.logits.position_statistics` (False: autograd under activation
    checkpointing, the earlier path); ``student_boundary``: the student's boundary-set
    log-prob is needed (ALM with debiasing); otherwise it is not computed."""

    logit_chunk: int = LOGIT_CHUNK
    recompute: bool = True
    fused: bool = True
    student_boundary: bool = True


def loss_settings(values: Any, names: Iterable[str], **settings: Any) -> LossSettings:
    """:class:`LossSettings` for the losses ``names``: the loss options from same-named
    attributes of ``values`` (a config), then ``settings``; the student's boundary
    statistics are computed only when a loss reads them and debiasing is on."""
    options = {f.name: getattr(values, f.name) for f in dataclasses.fields(LossSettings)
               if hasattr(values, f.name)}
    out = LossSettings(**{**options, **settings})
    out.student_boundary = out.debias and any(LOSSES[n].student_boundary for n in names)
    return out


def validate_loss_options(values: Any) -> None:
    """Check every registered loss's options as ``values`` (a config) gives them."""
    for loss in LOSSES.values():
        if hasattr(loss.options, "validate"):  # an options dataclass may check its values
            loss.options(**{f.name: getattr(values, f.name)
                            for f in dataclasses.fields(loss.options)}).validate()


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """``"alm+sft"`` or ``"alm:1+sft:0.5"`` -> [(name, weight), ...].

    Raises:
        ValueError: an unknown name or a weight that is not a positive number.
    """
    terms = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {'+'.join(LOSSES.names())}")
        w = float(weight) if weight else 1.0
        if not w > 0:
            raise ValueError(f"loss weight of {name} must be > 0")
        terms.append((name, w))
    if len({n for n, _ in terms}) != len(terms):
        raise ValueError(f"loss {spec!r} names a loss twice")
    return terms
