"""Types and registry of :mod:`spec_decode.backends`.

Its members import from here, so the package and its members never import each other;
the package docstring states the boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokensurgeon.registry import Registry

BACKENDS: Registry[Callable] = Registry("benchmark backend")


@dataclass
class BenchPlan:
    target: str  # HF directory of the target
    drafts: dict[str, str]  # draft name -> HF directory
    prompts: list[list[int]]  # token ids, already formatted
    gammas: list[int]
    temperatures: list[float]
    batch_sizes: list[int]
    max_tokens: int
    timed_prompts: int  # prompts timed at batch sizes below the largest (0 = all)
    seed: int
    device: str
    vllm_memory: float  # vLLM gpu_memory_utilization (on CPU: share of RAM for the KV cache)
    max_model_len: int
    dtype: str
    quiet: bool
    enforce_eager: bool = False  # vLLM: skip compilation and CUDA graphs (faster start)
    scratch: str = ""  # vLLM: JSONL of finished engine runs; a rerun skips those (resume)
    # Drafting rules measured at temperature > 0 (vLLM draft_sample_method; see
    # spec_decode.speculative). At temperature 0 they coincide: only the first is run.
    draft_samples: tuple[str, ...] = ("greedy", "probabilistic")

    def prompts_for(self, batch_size: int) -> list[list[int]]:
        """Every prompt at the largest batch size; ``timed_prompts`` of them below it."""
        if batch_size == max(self.batch_sizes) or not self.timed_prompts:
            return self.prompts
        return self.prompts[: self.timed_prompts]


def config_key(temperature: float, batch_size: int) -> str:
    return f"T{temperature:g}/b{batch_size}"


# Draft names that are vLLM proposers without a model: the value of a --draft entry and the
# speculative_config they run with (gamma is added). Greedy-only: no draft probabilities.
PROPOSERS: dict[str, dict] = {
    "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
}

# A draft path with one of these prefixes has its own tokenizer (token-level intersection,
# TLI): ``tli:`` matches tokens as strings as vLLM's ``use_heterogeneous_vocab`` does,
# ``tli-bytes:`` by their bytes (the HF backend only).
TLI_PREFIXES = {"tli:": "space", "tli-bytes:": "bytes"}


def split_draft_path(path: str) -> tuple[str, str | None]:
    """``tli:DIR`` -> (DIR, "space"); ``tli-bytes:DIR`` -> (DIR, "bytes"); DIR -> (DIR, None)."""
    for prefix, mode in TLI_PREFIXES.items():
        if path.startswith(prefix):
            return path[len(prefix):], mode
    return path, None


register = BACKENDS.register
backend_names = BACKENDS.names
