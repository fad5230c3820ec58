"""Cross-tokenizer (TLI) drafts of the HF backend on tiny models with two tokenizers.

The target speaks a SentencePiece-style vocabulary, the draft a byte-level BPE one. The
invariant: greedy speculative decoding with the TLI draft emits exactly the target's
greedy text, and the exact replay of the HF backend counts what the sampler accepted.
"""

from __future__ import annotations

import pytest
import tiny
import torch

from spec_decode import speculative
from spec_decode.backends import hf
from spec_decode.speculative import greedy_block_acceptance, speculative_generate, target_generate


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, bpe_tokenizer, spm_tokenizer):
    root = tmp_path_factory.mktemp("crosstok")
    target = tiny.save(tiny.tiny_gemma(len(spm_tokenizer), layers=2, seed=1), spm_tokenizer,
                       root / "target")
    draft = tiny.save(tiny.tiny_llama(len(bpe_tokenizer), layers=2, seed=2), bpe_tokenizer,
                      root / "draft")
    return target, draft


def test_vocab_map_matches_strings(bpe_tokenizer, spm_tokenizer):
    marks_t, marks_d = hf.space_marks(spm_tokenizer), hf.space_marks(bpe_tokenizer)
    assert marks_t == ("\u2581",) and marks_d == ("\u0120",)
    maps = {mode: hf.vocab_map(spm_tokenizer.get_vocab(), bpe_tokenizer.get_vocab(),
                               len(spm_tokenizer), len(bpe_tokenizer), 0, marks_t, marks_d, mode)
            for mode in ("space", "bytes")}
    specials = set(spm_tokenizer.all_special_ids)
    for mode, vm in maps.items():
        assert vm.size > 50
        for d, t in zip(vm.draft_ids.tolist(), vm.target_ids.tolist()):
            if mode == "bytes" and t not in specials:  # every pair spells the same text
                assert bpe_tokenizer.decode([d]) == spm_tokenizer.decode([t])
            assert vm.target_to_draft[t] == d
        outside = torch.ones(len(spm_tokenizer), dtype=torch.bool)
        outside[vm.target_ids] = False
        assert bool((vm.target_to_draft[outside] == 0).any())  # unk for the rest
    # vLLM's rule compares raw strings: byte-level "é" is the byte 0xE9, not the letter.
    wrong = [d for d, t in zip(maps["space"].draft_ids.tolist(), maps["space"].target_ids.tolist())
             if t not in specials and bpe_tokenizer.decode([d]) != spm_tokenizer.decode([t])]
    assert bpe_tokenizer.convert_tokens_to_ids("\u00e9") in wrong
    # Byte decoding also matches the newline (Ċ vs <0x0A>), which vLLM's rule misses.
    nl_d = bpe_tokenizer.convert_tokens_to_ids("\u010a")
    assert nl_d in maps["bytes"].draft_ids.tolist()
    assert nl_d not in maps["space"].draft_ids.tolist()
    assert maps["bytes"].size > maps["space"].size


def test_intersection_head_only_proposes_shared_tokens(dirs):
    draft, vm = hf.load_tli_draft(str(dirs[0]), str(dirs[1]), "space")
    ids = torch.randint(0, vm.target_size, (1, 12))
    logits = draft(input_ids=ids).logits[0]
    assert logits.shape == (12, vm.target_size)
    allowed = torch.zeros(vm.target_size, dtype=torch.bool)
    allowed[vm.target_ids] = True
    assert bool(allowed[logits.argmax(-1)].all())
    assert float(torch.softmax(logits, -1)[:, ~allowed].sum()) == 0.0
    # On the intersection the logits are the draft's own, read through the id map.
    plain = tiny.tiny_llama(len(hf.modelio.load_tokenizer(hf.modelio.resolve(str(dirs[1])))),
                            layers=2, seed=2)
    ref = plain(input_ids=vm.target_to_draft[ids]).logits[0]
    torch.testing.assert_close(logits[:, vm.target_ids], ref[:, vm.draft_ids], rtol=1e-4, atol=1e-5)


def near_target(draft_model, vocab_size: int, seed: int):
    """A target next-token function that often agrees with the TLI draft: its logits plus
    noise, and random logits outside the intersection (so it sometimes prefers those)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(512, vocab_size, generator=gen)

    def target(prefix: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            q = draft_model(input_ids=torch.tensor([prefix])).logits[0, -1]
        base = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
        return base + 0.6 * noise[len(prefix)] * base.std()

    return target


def test_tli_greedy_output_equals_target_greedy(dirs):
    draft, vm = hf.load_tli_draft(str(dirs[0]), str(dirs[1]), "space")
    target = near_target(draft, vm.target_size, seed=0)

    def draft_fn(prefix):
        with torch.inference_mode():
            return draft(input_ids=torch.tensor([prefix])).logits[0, -1]

    prompt = [2, 40, 41, 42, 43, 44]
    expected = target_generate(target, prompt, 24, 0.0)
    for gamma in (2, 3):
        run = speculative_generate(target, draft_fn, prompt, 24, gamma, 0.0)
        assert run.tokens == expected
        assert 0 < run.accepted < run.drafted  # both branches of verification ran
        # The HF backend's exact replay counts what the sampler accepted.
        with torch.inference_mode():
            q = hf.position_logits(draft, prompt, expected, "cpu")
        p = torch.stack([target(prompt + expected[:i]) for i in range(len(expected))])
        agree = (q.argmax(-1) == p.argmax(-1)).tolist()
        blocks, accepted, _ = greedy_block_acceptance(agree, gamma)
        assert accepted <= run.accepted and blocks <= run.blocks  # replay drops the cut last block
        assert run.blocks - blocks <= 1


def test_tli_invariant_fails_when_verification_is_broken(dirs, monkeypatch):
    draft, vm = hf.load_tli_draft(str(dirs[0]), str(dirs[1]), "space")
    target = near_target(draft, vm.target_size, seed=0)

    def draft_fn(prefix):
        with torch.inference_mode():
            return draft(input_ids=torch.tensor([prefix])).logits[0, -1]

    def accept_all(target_probs, draft_probs, drafted, uniforms, generator=None):
        g = drafted.shape[0]
        return speculative.Verdict(g, int(target_probs[g].argmax()))

    prompt = [2, 40, 41, 42, 43, 44]
    expected = target_generate(target, prompt, 24, 0.0)
    monkeypatch.setattr(speculative, "verify", accept_all)
    assert speculative_generate(target, draft_fn, prompt, 24, 2, 0.0).tokens != expected


def test_hf_assisted_generation_with_tli_draft_is_target_greedy(dirs):
    """The timing path: HF ``generate(assistant_model=TLI draft)`` emits the target's greedy text."""
    target = hf.modelio.load_model(hf.modelio.resolve(str(dirs[0])))
    draft, _ = hf.load_tli_draft(str(dirs[0]), str(dirs[1]), "bytes")
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    ids = torch.tensor([[2, 40, 41, 42, 43, 44]])
    common = {"max_new_tokens": 20, "do_sample": False, "min_new_tokens": 20}
    with torch.inference_mode():
        alone = target.generate(ids, **common)
        assisted = target.generate(ids, assistant_model=draft, **common)
    assert torch.equal(alone, assisted)
