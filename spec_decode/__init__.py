"""DistillSpec drafts and speculative-decoding benchmarks.

Boundary: everything under ``spec_decode`` is about a draft model q that proposes tokens and
a target model p that verifies them, both speaking the same tokenizer.

- :mod:`spec_decode.divergences`: the training divergences (fkl, rkl, jsd, tvd), pure math.
- :mod:`spec_decode.speculative`: the accept/reject rule and a reference speculative
  sampler over any two next-token functions, pure math.
- :mod:`spec_decode.draft`: ``spec make-draft``: a layer-pruned copy of the target, or a
  foreign small model transplanted onto the target's tokenizer.
- :mod:`spec_decode.train`: ``spec train``: the DistillSpec loop.
- :mod:`spec_decode.bench` and :mod:`spec_decode.backends`: ``spec bench``, with a vLLM
  backend (measured speed and acceptance) and an HF backend (exact per-token acceptance).
"""
