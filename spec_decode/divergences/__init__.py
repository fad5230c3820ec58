"""Registry of DistillSpec divergences between a target p and a draft q.

Boundary: pure tensor math, no models and no I/O. Every divergence takes log-probabilities
over the FULL vocabulary, already at the decoding temperature (see :func:`distributions`),
and returns one value per position; the caller masks and averages.

    divergence(target_logp [N, V], draft_logp [N, V], beta: float) -> [N]

``target_logp`` may hold ``-inf`` (a one-hot greedy target); every divergence here treats
0 * log 0 as 0. A divergence that, against a one-hot p, depends on log q(argmax p) alone
declares it as ``fn.of_argmax`` (fkl, tvd), and ``spec train --verify greedy`` then skips
the [c, V] one-hot target (:mod:`spec_decode.loss`).
Adding one is one new module with a ``@register("name")`` function.
"""

# Import the modules so they register themselves.
from spec_decode.divergences import fkl, jsd, rkl, tvd  # noqa: F401
from spec_decode.divergences.base import (  # noqa: F401 (re-exported)
    DIVERGENCES,
    Divergence,
    distributions,
    divergence_names,
    kl,
    register,
)
