"""Types and registry of :mod:`tokensurgeon.methods`.

Its members import from here, so the package and its members never import each other;
the package docstring states the boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokensurgeon.registry import Registry


@dataclass
class TransplantProblem:
    """One embedding matrix (input embeddings or lm_head) to extend.

    Attributes:
        donor_targets: [B, Dd] DONOR rows of the tokens to approximate.
        donor_anchors: [N, Dd] DONOR rows of the shared anchor tokens.
        base_anchors: [N, Hb] BASE rows of the same anchors (same order).
            These three are float32 rows: tensors, or row views (``streaming.Rows``) that
            read their rows only when sliced (``x[a:b]``) or converted whole (``x.to(...)``,
            ``x.float()``); a method reads them in batches, or converts them once.
        base_matrix: [Vb, Hb] the whole BASE matrix in BASE's dtype (subword uses arbitrary
            pieces; compute in float32).
        target_bytes: per target, the bytes it stands for (None for specials/empty ids).
        base_byte_index: BASE bytes -> BASE id, for segmenting target bytes.
        options: the method's own options dataclass (``METHODS[name].options``), or None.
        batch_size: targets per batch.
        device: torch device for the math.
    """

    donor_targets: torch.Tensor
    donor_anchors: torch.Tensor
    base_anchors: torch.Tensor
    base_matrix: torch.Tensor
    target_bytes: list[bytes | None]
    base_byte_index: dict[bytes, int]
    options: Any = None
    batch_size: int = 1024
    device: str = "cpu"


@dataclass
class MethodResult:
    """Rows for every target, plus how each was made.

    Attributes:
        rows: [B, Hb] new BASE-space rows.
        how: per target, the method that produced it (a method may fall back, e.g.
            ``subword`` -> ``mean`` when the bytes cannot be segmented).
        anchors: optional [B, k] positions into the anchor list; coef: [B, k] weights.
        donor_error: optional [B] relative reconstruction error in DONOR space.
        output_rows: optional [B, Hb] rows meant for an output (lm_head) matrix when they
            differ from ``rows`` (the input rows); None means the same rows serve both.
        mean_coef: optional [B] weight of the BASE anchor mean row m: before shrinking,
            ``raw[b] = sum_j coef[b, j] * anchor_j + mean_coef[b] * m``.
        shrink: (input, output) factors: ``rows = m + shrink[0] * (raw - m)``, and
            ``output_rows`` likewise with shrink[1].
        raw_rows: optional [B, Hb] rows before shrinking, given when the output factor is
            left to the caller (``--output-shrink auto``); may be ``rows`` itself.
        mean_row: optional [Hb] m, the row the shrink pulls toward.
    """

    rows: torch.Tensor
    how: list[str]
    anchors: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    donor_error: torch.Tensor | None = field(default=None)
    output_rows: torch.Tensor | None = None
    mean_coef: torch.Tensor | None = None
    shrink: tuple[float, float] = (1.0, 1.0)
    raw_rows: torch.Tensor | None = None
    mean_row: torch.Tensor | None = None


def row_mean(rows, block: int = 4096) -> torch.Tensor:
    """mean over dim 0, [H] float32, of ``rows`` [N, H] (a tensor or a row view), summed
    a block of rows at a time (float64 totals), so no float32 copy of all rows is made."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64)
    for start in range(0, rows.shape[0], block):
        total += rows[start:start + block].float().sum(0, dtype=torch.float64)
    return (total / max(1, rows.shape[0])).float()


Method = Callable[[TransplantProblem], MethodResult]
METHODS: Registry[Method] = Registry("transplant method")
register = METHODS.register
method_names = METHODS.names


def register_method(name: str, options: type | None = None) -> Callable[[Method], Method]:
    """Register a method with its options dataclass (``fn.options``; None: it takes none).

    The orchestrator builds the options from same-named fields of its config, so it never
    tests method names.
    """
    def wrap(fn: Method) -> Method:
        fn.options = options  # type: ignore[attr-defined]
        return METHODS.register(name)(fn)

    return wrap


def options_for(name: str, values: Any) -> Any:
    """The options dataclass of method ``name`` filled from same-named attributes of
    ``values`` (a config); None for methods without options."""
    cls = getattr(METHODS[name], "options", None)
    if cls is None:
        return None
    import dataclasses

    return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)
                  if hasattr(values, f.name)})
