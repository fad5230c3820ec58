"""``mean``: new tokens get the mean of BASE's anchor rows (a baseline)."""

from tokensurgeon.methods.base import (
    ANCHOR_MEAN,
    MethodResult,
    TransplantProblem,
    register_method,
    row_mean,
)


@register_method(ANCHOR_MEAN)
def mean_rows(problem: TransplantProblem) -> MethodResult:
    """Every target row is mean(base_anchors) [Hb]: rows [B, Hb] is one row broadcast (a
    view: read-only, no memory per target)."""
    n = problem.donor_targets.shape[0]
    rows = row_mean(problem.base_anchors).unsqueeze(0).expand(n, -1)
    return MethodResult(rows, [ANCHOR_MEAN] * n)
