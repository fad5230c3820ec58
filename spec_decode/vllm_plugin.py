"""vLLM plugin: serve reduced-head drafts (:mod:`spec_decode.reduced_head`) in stock vLLM.

Boundary: model classes only; vLLM imports this module through the ``vllm.general_plugins``
entry point ``tokensurgeon_reduced_head`` (``pyproject.toml``) in every process it starts,
so no patched vLLM is needed, on CPU or GPU.

For each text architecture vLLM serves (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``Gemma3ForCausalLM``, ...) it registers ``ReducedHead<Arch>``: the same model, loaded from
the same weights, whose ``compute_logits`` multiplies the hidden states by only the K head
rows named in the config (:data:`~spec_decode.reduced_head.CONFIG_KEY`), applies the base
head's soft cap and logit scale, and scatters the K logits into a -inf row of the config's
full ``vocab_size``. vLLM's drafting (argmax, or sampling from the softmax) then never
proposes a token outside the set, and verification is unchanged.
"""

from __future__ import annotations

import importlib

from spec_decode.reduced_head import ARCH_PREFIX, CONFIG_KEY, base_architecture

# Used when vLLM's own table of architectures cannot be read (it is internal).
FALLBACK = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
}


def _architectures() -> dict[str, tuple[str, str]]:
    """{architecture: (module under vllm.model_executor.models, class name)}."""
    try:
        from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS
        return {a: tuple(v) for a, v in _TEXT_GENERATION_MODELS.items()}
    except (ImportError, AttributeError):
        return dict(FALLBACK)


def register() -> None:
    """Register ``ReducedHead<Arch>`` for every text-generation architecture (lazily: a class
    is built only when a config names it)."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for arch in _architectures():
        name = ARCH_PREFIX + arch
        if name not in known:
            ModelRegistry.register_model(name, f"{__name__}:{name}")


def reduced_head_class(base: type) -> type:
    """A subclass of the vLLM model class ``base`` whose logits come from the reduced head."""
    import torch

    class ReducedHead(base):
        def load_weights(self, weights):
            loaded = super().load_weights(weights)
            config = self.config if hasattr(self, "config") else None
            ids = getattr(config, CONFIG_KEY, None)
            if ids is None:
                raise ValueError(f"{type(self).__name__}: config.json has no {CONFIG_KEY}; "
                                 "make the draft with tokensurgeon spec make-draft --head-tokens K")
            head = self.lm_head.weight
            if head.shape[0] < max(ids) + 1:
                raise ValueError(f"{type(self).__name__}: the head has {head.shape[0]} rows on this "
                                 "rank; reduced heads need tensor_parallel_size 1 for the draft")
            index = torch.tensor(ids, dtype=torch.long, device=head.device)
            self.head_token_ids = index
            # A plain tensor: vLLM's loader checks that every parameter came from the files.
            self.head_rows = head.detach()[index].clone()
            return loaded

        def compute_logits(self, hidden_states, *args, **kwargs):
            proc = self.logits_processor
            rows = self.head_rows.to(hidden_states.dtype)
            logits = torch.nn.functional.linear(hidden_states, rows)
            cap = getattr(proc, "soft_cap", None)  # vLLM's order: soft cap, then scale
            if cap:
                logits = torch.tanh(logits / cap) * cap
            scale = getattr(proc, "scale", 1.0)
            if scale != 1.0:
                logits = logits * scale
            vocab = getattr(proc, "org_vocab_size", None) or self.config.vocab_size
            out = logits.new_full((logits.shape[0], vocab), float("-inf"))
            out[:, self.head_token_ids] = logits
            return out

    ReducedHead.__name__ = ReducedHead.__qualname__ = ARCH_PREFIX + base.__name__
    return ReducedHead


_built: dict[str, type] = {}


def __getattr__(name: str):
    """``ReducedHead<Arch>`` classes, built on first use (PEP 562)."""
    if not name.startswith(ARCH_PREFIX):
        raise AttributeError(name)
    if name not in _built:
        arch = base_architecture(name)
        entry = _architectures().get(arch)
        if entry is None:
            raise AttributeError(f"vLLM serves no architecture {arch!r}")
        module = importlib.import_module(f"vllm.model_executor.models.{entry[0]}")
        _built[name] = reduced_head_class(getattr(module, entry[1]))
    return _built[name]
