#!/usr/bin/env bash
# Short GPU run of bench/spec.py: SmolLM2-135M alone vs the drafts trained on CPU, in vLLM.
#
#   OUT=/path/to/results bash bench/spec_gpu.sh MODELS_DIR
#
# MODELS_DIR holds four HF directories: smollm2-135m (the target), cut, distillspec and
# fkl-fixed (written by bench/spec.py under OUT/drafts on the CPU machine).
# On a fresh Linux GPU box it installs vLLM from PyPI when it is not importable yet.
# vllm 0.33.0 pins torch 2.14.0 (CUDA build), while pyproject pins torch 2.13.0 for the CPU
# machines, so tokensurgeon is installed without its dependencies and those are listed here.
# Budget: install ~2-3 min, then gamma 2,3,4 x T 0,1 x batch 1,8 for two drafts (8 engines,
# each started with --enforce-eager to keep start-up short), capped at 6 minutes.
set -euo pipefail
MODELS=${1:?usage: OUT=DIR bash bench/spec_gpu.sh MODELS_DIR}
OUT=${OUT:-out/spec-gpu}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
if ! python3 -c "import vllm, matplotlib, tokensurgeon" 2>/dev/null; then
  VENV=${VENV:-"${TMPDIR:-/tmp}/spec-gpu-venv"}
  python3 -m venv "$VENV"
  . "$VENV/bin/activate"
  pip install -q "vllm==0.33.0" "matplotlib>=3.7" "gguf>=0.10" "accelerate>=1.0" \
      sentencepiece protobuf pyyaml psutil tqdm
  pip install -q --no-deps -e .
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 360 python bench/spec.py --models-dir "$MODELS" --target "$MODELS/smollm2-135m" \
    --out "$OUT" --drafts distillspec,fkl-fixed --dtype bfloat16 --vllm-memory 0.3 \
    --enforce-eager --num-prompts 64 --timed-prompts 16 --max-tokens 128 \
    2>&1 | tee "$OUT/stdout.txt"
