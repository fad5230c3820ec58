"""tokensurgeon: move knowledge between language models that do not share a tokenizer.

This package holds the transplant and the shared core (model I/O, token identity,
evaluation). ``distill`` (ALM) and ``spec_decode`` (DistillSpec) build on it.
"""

from importlib import metadata as _metadata

try:  # one source: the version in pyproject.toml, as installed
    __version__ = _metadata.version("tokensurgeon")
except _metadata.PackageNotFoundError:  # a source tree that was never installed (pip install -e .)
    __version__ = "unknown (not installed)"
