"""Registry of transplant methods: how a DONOR token that BASE lacks gets BASE-space rows.

Boundary: a method maps a :class:`TransplantProblem` (tensors and byte strings, no files)
to rows in BASE's space. Each method lives in its own module and registers itself with
:func:`register`; the CLI offers ``sorted(METHODS)``, so adding a method never touches it.
"""

# Importing the modules registers them.
from tokensurgeon.methods import mean, omp, subword, zero  # noqa: F401
from tokensurgeon.methods.base import (  # noqa: F401 (re-exported)
    METHODS,
    Method,
    MethodResult,
    TransplantProblem,
    method_names,
    options_for,
    register,
    register_method,
)
