"""``omp``: Orthogonal Matching Pursuit over shared anchor tokens (the default).

Each new token's DONOR row is written as a sparse combination of at most k anchor rows in
DONOR's space; the same coefficients applied to BASE's rows of those anchors give its BASE
row. The math is in :mod:`tokensurgeon.omp`; this module batches it, retrieves candidates
(:mod:`tokensurgeon.ann`) and moves it to the chosen device.

Defaults (v2) come from the direction-2 diagnosis (bench/transplant_diagnose.py): OMP rows
help as *input* rows, but as *output* rows of a tied model their probability can leak away
from the real tokens (direction 2, 216k new tokens), while in direction 1 (3k new tokens)
they help. So the output-row weight is chosen per run (``--output-shrink auto``, in
:mod:`tokensurgeon.transplant`): every weight of ``output_grid`` is scored on a training
text and the lowest bits per byte is kept; a tied BASE is untied only when the chosen output
rows differ from the input rows. The v1 behaviour is ``--no-centre --search exact -k 64
--candidates 256 --refreshes 10 --output-shrink 1 --no-untie``; the first v2 default is
``--output-shrink 0``. The options:
- ``centre``: both spaces are centred on their anchor mean, and selection runs on
  unit-norm centred anchors. The shared component every embedding carries then no longer
  dominates the first picks, and a new row is ``mean + sum_j c_j (anchor_j - mean)``.
- ``shrink`` / ``output_shrink``: a new row is pulled toward the anchor mean,
  ``mu + lambda (row - mu)``; input rows and output (lm_head) rows get their own lambda,
  because an output row takes probability mass from every real token wherever its logit is
  high, while an input row only matters where the token occurs. Default 1 (input) and
  auto (output: 0 is the anchor mean, which has Hewitt's Jensen bound on the leak; 1 the
  OMP rows); v1: both 1. Under auto the method returns the raw rows (``rows`` itself at
  shrink 1, no copy) and the caller builds the output rows.
- ``coefficients``: ``lstsq`` (OMP's least-squares weights, signed and unbounded) or
  ``softmax`` (a convex combination over the selected anchors, weights
  ``softmax(cos(target, anchor) / temperature)``, WECHSEL-style), which keeps every new
  row inside the convex hull of real rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokensurgeon import omp as omp_math
from tokensurgeon import progress
from tokensurgeon.ann import AnchorIndex
from tokensurgeon.errors import UsageError
from tokensurgeon.methods.base import (
    MethodOptions,
    MethodResult,
    TransplantProblem,
    register_method,
    shrink_rows,
)

SEARCHES = ("auto", "faiss", "exact", "pca")
COEFFICIENTS = ("lstsq", "softmax")


@dataclass
class OmpOptions(MethodOptions):
    """Options of the ``omp`` method (the single source of their defaults and help; each
    field is also a ``transplant`` flag)."""

    k: int = field(default=16, metadata={
        "short": "-k", "help": "OMP: at most this many anchor tokens per new token"})
    candidates: int = field(default=32, metadata={
        "help": "OMP: anchors preselected per token (see --search) before the greedy search; "
                "0 searches every anchor at every step (exact, slow)"})
    refreshes: int = field(default=0, metadata={
        "help": "OMP: times the candidates are re-drawn by correlation with the residual, at "
                "geometrically spaced steps (each costs one search); 0 keeps the first "
                "preselection (fastest, least accurate)"})
    search: str = field(default="auto", metadata={
        "choices": SEARCHES,
        "help": "OMP: how candidates are found: exact (one GEMM over every anchor), faiss "
                "(approximate inverted-file index; falls back to exact without faiss), or auto "
                "(faiss when the exact search is large)"})
    centre: bool = field(default=True, metadata={
        "help": "OMP: centre both spaces on the anchor mean and select on unit-norm anchors "
                "(--no-centre: v1, raw anchors)"})
    coefficients: str = field(default="lstsq", metadata={
        "choices": COEFFICIENTS,
        "help": "OMP: lstsq (least-squares weights of the selected anchors) or softmax (convex "
                "weights softmax(cosine / --temperature) over them: rows stay in the hull of "
                "real rows)"})
    temperature: float = field(default=0.1, metadata={
        "help": "OMP: softmax temperature for --coefficients softmax"})
    shrink: float = field(default=1.0, metadata={
        "help": "OMP: input rows become mean + SHRINK * (row - mean) (1 keeps them)"})
    output_shrink: str = field(default="auto", metadata={
        "help": "OMP: the same for output (lm_head) rows, a number or auto: score every "
                "--output-grid weight on a training text (--calibration-text; one pass of "
                "the transformer body, the candidate output matrices applied to its final "
                "hidden states) and keep the lowest bits per byte. Used for an untied lm_head "
                "(see --untie); a tied matrix takes the input rows"})
    output_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                     metadata={"comma": True, "help":
                                               "OMP: output-row weights that --output-shrink "
                                               "auto scores (0 = the anchor mean, 1 = the "
                                               "OMP rows)"})

    def fixed_output_shrink(self) -> float | None:
        """``output_shrink`` as a number, or None for ``auto`` (chosen per run on text)."""
        return None if str(self.output_shrink) == "auto" else float(self.output_shrink)

    def validate(self) -> None:
        if self.k < 1:
            raise UsageError(f"--k must be >= 1 (got {self.k})")
        if self.candidates < 0:
            raise UsageError(f"--candidates must be >= 0 (got {self.candidates})")
        if 0 < self.candidates < self.k:
            raise UsageError(f"--candidates ({self.candidates}) must be >= --k ({self.k}), "
                             "or 0 for exact OMP")
        if self.refreshes < 0:
            raise UsageError(f"--refreshes must be >= 0 (got {self.refreshes})")
        if self.search not in SEARCHES:
            raise UsageError(f"--search must be one of {SEARCHES} (got {self.search!r})")
        if self.coefficients not in COEFFICIENTS:
            raise UsageError(f"--coefficients must be one of {COEFFICIENTS} "
                             f"(got {self.coefficients!r})")
        if str(self.output_shrink) != "auto":
            try:
                float(self.output_shrink)
            except ValueError:
                raise UsageError(f"--output-shrink must be auto or a number (got "
                                 f"{self.output_shrink!r})") from None
        if not self.output_grid:
            raise UsageError("--output-grid needs at least one weight, e.g. 0,0.5,1")
        if self.temperature <= 0:
            raise UsageError(f"--temperature must be > 0 (got {self.temperature})")

    def check_anchors(self, n_anchors: int) -> None:
        if self.k > n_anchors:
            raise UsageError(f"--k {self.k} is larger than the {n_anchors} shared anchor "
                             f"tokens; pass --k {n_anchors} or less")

    def min_anchors(self) -> int:
        return self.k

    def output_rows_differ(self, output_factor: float | None = None) -> bool:
        if output_factor is None:
            output_factor = self.fixed_output_shrink()
        return output_factor is not None and output_factor != self.shrink


def softmax_weights(targets: torch.Tensor, unit_atoms: torch.Tensor, idx: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """[B, k] convex weights softmax(cos(target_b, atom_j) / temperature) over idx [B, k].

    ``unit_atoms`` [N, D] are unit-norm; ``targets`` [B, D] any norm.
    """
    unit_t = targets / targets.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = torch.bmm(unit_atoms[idx], unit_t.unsqueeze(-1)).squeeze(-1)  # [B, k]
    return torch.softmax(cos / temperature, dim=1)


@register_method("omp", OmpOptions)
def omp_rows(problem: TransplantProblem) -> MethodResult:
    """OMP coefficients in DONOR space, applied to BASE anchors. Rows [B, Hb]."""
    opts: OmpOptions = problem.options
    device = torch.device(problem.device)
    anchors = problem.donor_anchors.to(device, torch.float32)
    base_anchors = problem.base_anchors.to(device, torch.float32)
    n_targets, n_atoms = problem.donor_targets.shape[0], anchors.shape[0]
    k = min(opts.k, n_atoms)
    exact = opts.candidates <= 0 or opts.candidates >= n_atoms
    zero_d = torch.zeros(anchors.shape[1], device=device)
    mu_d = anchors.mean(0) if opts.centre else zero_d
    mu_b = base_anchors.mean(0)
    atoms = anchors - mu_d
    norms = atoms.norm(dim=1).clamp_min(1e-12) if opts.centre else torch.ones(n_atoms, device=device)
    unit = atoms / norms.unsqueeze(1)
    base_atoms = base_anchors - mu_b if opts.centre else base_anchors
    # On a GPU one exact GEMM pass is cheap; faiss here is a CPU index.
    search = "exact" if opts.search == "auto" and device.type == "cuda" else opts.search
    index = None if exact else AnchorIndex(unit, search, n_queries=n_targets)
    schedule = omp_math.refresh_schedule(k, opts.refreshes)
    rows = torch.empty(n_targets, base_anchors.shape[1], dtype=torch.float32)
    # Output rows of their own only when they differ from the input rows; under auto the
    # caller picks them later from the raw (unshrunk) rows, which are ``rows`` at shrink 1.
    out_shrink = opts.fixed_output_shrink()
    out_rows = (torch.empty_like(rows) if out_shrink is not None and out_shrink != opts.shrink
                else None)
    raw_rows = (rows if opts.shrink == 1.0 else torch.empty_like(rows)) if out_shrink is None \
        else None
    all_idx = torch.empty(n_targets, k, dtype=torch.long)
    all_coef = torch.empty(n_targets, k, dtype=torch.float32)
    all_mean_coef = torch.empty(n_targets, dtype=torch.float32)
    errors = torch.empty(n_targets, dtype=torch.float32)
    batch = problem.batch_size
    report = progress.get().report  # the caller's phase line counts tokens done
    report(0, n_targets, "tok")
    for start in range(0, n_targets, batch):
        targets = problem.donor_targets[start : start + batch].to(device, torch.float32) - mu_d
        if exact:
            idx, coef = omp_math.omp_exact(targets, unit, k)
        else:
            idx, coef = omp_math.omp_fast(targets, unit, k, opts.candidates, refresh=schedule,
                                          search=index.search)
        coef = coef / norms[idx]  # weights of the (centred) anchors themselves
        if opts.coefficients == "softmax":
            coef = softmax_weights(targets, unit, idx, opts.temperature)
            raw = omp_math.reconstruct(base_anchors, idx, coef)  # convex: inside the hull
            approx = omp_math.reconstruct(anchors, idx, coef) - mu_d
            mean_coef = torch.zeros(coef.shape[0], device=device)
        else:
            raw = omp_math.reconstruct(base_atoms, idx, coef) + (mu_b if opts.centre else 0.0)
            approx = omp_math.reconstruct(atoms, idx, coef)
            mean_coef = 1.0 - coef.sum(1) if opts.centre else torch.zeros(coef.shape[0], device=device)
        end = start + targets.shape[0]
        errors[start:end] = omp_math.relative_error(targets + mu_d, approx + mu_d).cpu()
        rows[start:end] = shrink_rows(raw, mu_b, opts.shrink).cpu()
        if out_rows is not None:
            out_rows[start:end] = shrink_rows(raw, mu_b, out_shrink).cpu()
        if raw_rows is not None and raw_rows is not rows:
            raw_rows[start:end] = raw.cpu()
        all_idx[start:end] = idx.cpu()
        # Before shrinking, row = sum_j coef_j B_j + mean_coef * mean(B anchors).
        all_coef[start:end] = coef.cpu()
        all_mean_coef[start:end] = mean_coef.cpu()
        report(end)
    return MethodResult(rows, ["omp"] * n_targets, all_idx, all_coef, errors,
                        output_rows=out_rows, mean_coef=all_mean_coef,
                        shrink=(opts.shrink, opts.shrink if out_shrink is None else out_shrink),
                        raw_rows=raw_rows, mean_row=mu_b.cpu(),
                        output_grid=list(opts.output_grid) if out_shrink is None else None)
