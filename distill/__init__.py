"""``tokensurgeon distill``: ALM cross-tokenizer distillation (Minixhofer et al., 2025).

Boundary: this package trains a student from a teacher whose tokenizer may differ. It is
laid out by concern: :mod:`distill.alignment` (bytes -> chunks, pure), :mod:`distill.logprobs`
(memory-lean per-position statistics from hidden states), :mod:`distill.losses` (pure loss
functions behind a registry), :mod:`distill.data` (documents -> aligned examples) and
:mod:`distill.trainer` (the one training loop and the command). Model I/O, token identity
and the optimisation/checkpoint pieces come from :mod:`tokensurgeon`.
"""
