"""``mean``: new tokens get the mean of BASE's anchor rows (a baseline)."""

from tokensurgeon.methods.base import (
    ANCHOR_MEAN,
    MethodResult,
    TransplantProblem,
    register_method,
)


@register_method(ANCHOR_MEAN)
def mean_rows(problem: TransplantProblem) -> MethodResult:
    """Every target row is mean(base_anchors) [Hb]."""
    n = problem.donor_targets.shape[0]
    rows = problem.base_anchors.mean(0, keepdim=True).expand(n, -1).clone()
    return MethodResult(rows, [ANCHOR_MEAN] * n)
