"""Registry of transplant methods: how a DONOR token that BASE lacks gets BASE-space rows.

Boundary: a method maps a :class:`TransplantProblem` (tensors and byte strings, no files)
to rows in BASE's space. Each method lives in its own module and registers itself with
:func:`register_method`, naming its :class:`MethodOptions` dataclass; the CLI offers
``sorted(METHODS)`` and the options' fields as flags, so adding a method touches only its
module and the import below.
"""

# Importing the modules registers them.
from tokensurgeon.methods import mean, omp, subword, zero  # noqa: F401
from tokensurgeon.methods.base import (  # noqa: F401 (re-exported)
    ANCHOR_MEAN,
    METHODS,
    Method,
    MethodOptions,
    MethodResult,
    TransplantProblem,
    method_names,
    options_for,
    register,
    register_method,
    shrink_rows,
)

# transplant's --method unless one is given.
DEFAULT_METHOD = "omp"
