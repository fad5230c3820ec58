"""``subword``: a new token gets the mean of BASE's rows for the pieces of its bytes.

The token's bytes are segmented into BASE vocabulary pieces by greedy longest match, which
covers any byte string for byte-level BPE and for SentencePiece with byte fallback. A token
with no bytes (a special token) or bytes BASE cannot spell falls back to ``mean``.
"""

import torch

from tokensurgeon.methods.base import (
    ANCHOR_MEAN,
    MethodResult,
    TransplantProblem,
    register_method,
)
from tokensurgeon.token_identity import encode_bytes_greedy


@register_method("subword")
def subword_rows(problem: TransplantProblem) -> MethodResult:
    """Row b = mean of base_matrix[pieces(target_bytes[b])] ([B, Hb])."""
    index = problem.base_byte_index
    max_len = max((len(b) for b in index), default=1)
    fallback = problem.base_anchors.mean(0)
    rows = torch.empty(len(problem.target_bytes), problem.base_matrix.shape[1],
                       dtype=problem.base_matrix.dtype)
    how: list[str] = []
    for i, data in enumerate(problem.target_bytes):
        pieces = encode_bytes_greedy(data, index, max_len) if data else None
        if pieces:
            rows[i] = problem.base_matrix[pieces].mean(0)
            how.append("subword")
        else:
            rows[i] = fallback
            how.append(ANCHOR_MEAN)
    return MethodResult(rows, how)
