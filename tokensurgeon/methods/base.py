"""Types and registry of :mod:`tokensurgeon.methods`.

Its members import from here, so the package and its members never import each other;
the package docstring states the boundary. A method owns its options: a
:class:`MethodOptions` dataclass whose fields (with ``help`` metadata, as in
:mod:`tokensurgeon.config`) become ``transplant`` flags, and whose hooks answer what the
orchestrator asks of the method (validity, anchors needed, whether output rows differ)."""

from __future__ import annotations

import dataclasses
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
        base_matrix: [Vb, Hb] the whole BASE matrix (subword uses arbitrary pieces).
        target_bytes: per target, the bytes it stands for (None for specials/empty ids).
        base_byte_index: BASE bytes -> BASE id, for segmenting target bytes.
        options: the method's own options (an instance of ``METHODS[name].options``).
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
        output_grid: with ``raw_rows``, the output factors the caller scores on text to
            choose ``shrink[1]``.
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
    output_grid: list[float] | None = None


# The label of rows filled with the anchor mean: the ``mean`` method's, a method's fallback
# and the rows of ids beyond DONOR's matrix.
ANCHOR_MEAN = "mean"


def shrink_rows(rows: torch.Tensor, mean: torch.Tensor, factor: float) -> torch.Tensor:
    """[B, H] rows pulled toward ``mean`` [H]: mean + factor * (rows - mean)."""
    if factor == 1.0:
        return rows
    return mean + factor * (rows - mean)


@dataclass
class MethodOptions:
    """A method's options. A method with options subclasses this with fields (each with
    ``help`` metadata: it becomes a ``transplant`` flag of the same name) and overrides the
    hooks it needs; a method without options takes this class as it is."""

    def validate(self) -> None:
        """Refuse bad option values (a one-line UsageError naming the flag)."""

    def check_anchors(self, n_anchors: int) -> None:
        """Refuse a problem with too few shared anchor tokens for these options."""

    def min_anchors(self) -> int:
        """The held-out (fake-new) check runs only with more anchors than this."""
        return 1

    def output_rows_differ(self, output_factor: float | None = None) -> bool:
        """Whether output (lm_head) rows differ from input rows, so a tied BASE is untied;
        ``output_factor`` is the one chosen on text when the caller chose it."""
        return False


Method = Callable[[TransplantProblem], MethodResult]
METHODS: Registry[Method] = Registry("transplant method")
register = METHODS.register
method_names = METHODS.names


def register_method(name: str, options: type[MethodOptions] = MethodOptions,
                    ) -> Callable[[Method], Method]:
    """Register a method with its options dataclass (``fn.options``).

    The transplant config gains the options' fields as flags, and the orchestrator builds
    the options from them, so it never names a method or an option.
    """
    def wrap(fn: Method) -> Method:
        fn.options = options  # type: ignore[attr-defined]
        return METHODS.register(name)(fn)

    return wrap


def options_for(name: str, values: Any) -> MethodOptions:
    """The options of method ``name`` filled from same-named attributes of ``values`` (a
    config)."""
    cls = METHODS[name].options
    return cls(**{f.name: getattr(values, f.name) for f in dataclasses.fields(cls)
                  if hasattr(values, f.name)})
