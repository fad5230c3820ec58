"""``zero``: new tokens get all-zero rows (a baseline)."""

import torch

from tokensurgeon.methods.base import MethodResult, TransplantProblem, register_method


@register_method("zero")
def zero_rows(problem: TransplantProblem) -> MethodResult:
    """[B, Hb] float32 zeros (one row broadcast: a read-only view)."""
    n = problem.donor_targets.shape[0]
    rows = torch.zeros(1, problem.base_anchors.shape[1], dtype=torch.float32).expand(n, -1)
    return MethodResult(rows, ["zero"] * n)
