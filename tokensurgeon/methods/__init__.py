"""Registry of transplant methods: how a DONOR token that BASE lacks gets BASE-space rows.

Boundary: a method maps a :class:`TransplantProblem` (tensors and byte strings, no files)
to rows in BASE's space. Each method lives in its own module and registers itself with
:func:`register`; the CLI offers ``sorted(METHODS)``, so adding a method never touches it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
        k: sparsity (OMP).
        candidates: OMP preselection width; 0 means exact OMP.
        refreshes: OMP candidate refreshes (see :func:`tokensurgeon.omp.refresh_schedule`).
        batch_size: targets per batch.
        device: torch device for the math.
        progress: label for a progress bar, or None for no bar.
    """

    donor_targets: torch.Tensor
    donor_anchors: torch.Tensor
    base_anchors: torch.Tensor
    base_matrix: torch.Tensor
    target_bytes: list[bytes | None]
    base_byte_index: dict[bytes, int]
    k: int = 64
    candidates: int = 256
    refreshes: int = 10
    batch_size: int = 1024
    device: str = "cpu"
    progress: str | None = None


@dataclass
class MethodResult:
    """Rows for every target, plus how each was made.

    Attributes:
        rows: [B, Hb] new BASE-space rows.
        how: per target, the method that produced it (a method may fall back, e.g.
            ``subword`` -> ``mean`` when the bytes cannot be segmented).
        anchors: optional [B, k] positions into the anchor list; coef: [B, k] weights.
        donor_error: optional [B] relative reconstruction error in DONOR space.
    """

    rows: torch.Tensor
    how: list[str]
    anchors: torch.Tensor | None = None
    coef: torch.Tensor | None = None
    donor_error: torch.Tensor | None = field(default=None)


Method = Callable[[TransplantProblem], MethodResult]
METHODS: Registry[Method] = Registry("transplant method")
register = METHODS.register
method_names = METHODS.names


# Importing the modules registers them.
from tokensurgeon.methods import mean, omp, subword, zero  # noqa: F401
