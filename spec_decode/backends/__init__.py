"""Registry of ``spec bench`` backends.

Boundary: a backend turns a :class:`BenchPlan` (token-id prompts, model directories and the
grid of gamma x temperature x batch size) into raw measurements; :mod:`spec_decode.bench`
turns those into alpha, tau, speedups, tables and plots. Backends never format output.

    backend(plan: BenchPlan) -> dict with keys
      "target": {config_key: Timing}          # target alone
      "drafts_alone": {draft: {config_key: Timing}}   # for the cost ratio c (may be empty)
      "speculative": [Measurement, ...]       # one per draft x gamma x temperature x batch
                                              # x draft_sample (temperature > 0 only)
    where config_key = f"T{temperature}/b{batch_size}" and Timing, Measurement are dicts
    (see each backend's docstring). Acceptance counts follow vLLM's meaning: a "draft" is
    one verification step of gamma proposed tokens.
"""

# Importing the modules registers them.
from spec_decode.backends import hf, vllm_engine  # noqa: F401
from spec_decode.backends.base import (  # noqa: F401 (re-exported)
    BACKENDS,
    PROPOSERS,
    BenchPlan,
    backend_names,
    config_key,
    register,
    split_draft_path,
)
