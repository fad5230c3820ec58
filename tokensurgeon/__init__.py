"""tokensurgeon: move knowledge between language models that do not share a tokenizer.

This package holds the transplant and the shared core (model I/O, token identity,
evaluation). ``distill`` (ALM) and ``spec_decode`` (DistillSpec) build on it.
"""

__version__ = "0.1.0"
