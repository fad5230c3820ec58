"""``tokensurgeon distill``: ALM cross-tokenizer distillation (Minixhofer et al., 2025).

Boundary: this package trains a student from a teacher whose tokenizer may differ. It is
laid out by concern: :mod:`distill.alignment` (bytes -> chunks, pure), :mod:`distill.losses`
(pure loss functions behind a registry), :mod:`distill.data` (documents -> aligned
examples) and :mod:`distill.trainer` (the one training loop and the command). Logits math
(chunked lm_head, realised-token and boundary-set log-probs) lives in
:mod:`tokensurgeon.logits`; model I/O, token identity, the teacher cache
(:mod:`tokensurgeon.teacher_cache`) and the training scaffold (:mod:`tokensurgeon.training`)
come from :mod:`tokensurgeon` too.
"""
