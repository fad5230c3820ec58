"""``zero``: new tokens get all-zero rows (a baseline)."""

import torch

from tokensurgeon.methods.base import MethodResult, TransplantProblem, register_method


@register_method("zero")
def zero_rows(problem: TransplantProblem) -> MethodResult:
    """[B, Hb] zeros."""
    n = problem.donor_targets.shape[0]
    rows = torch.zeros(n, problem.base_anchors.shape[1], dtype=problem.base_anchors.dtype)
    return MethodResult(rows, ["zero"] * n)
