"""Conventions survive transplant and saving: BOS exactly when the base had one, chat and
stop tokens copied bit-exactly, generation stops on the base's end tokens; eval --bos."""

from __future__ import annotations

import math

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tokensurgeon import conventions, modelio
from tokensurgeon.evaluate import bits_per_byte, bos_check, encode_segment
from tokensurgeon.transplant import TransplantConfig, transplant

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
              "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _make(directory, tokenizer, model, add_bos: bool, chat: list[str], template: str | None,
          eos: str | None = None, stops: list[str] = ()):
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": chat},
                                     replace_extra_special_tokens=False)
    if eos is not None:
        tokenizer.eos_token = eos
    tokenizer.add_bos_token = add_bos
    tokenizer.chat_template = template
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tiny.save(model, tokenizer, directory)
    gen = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=[tokenizer.eos_token_id]
                           + tokenizer.convert_tokens_to_ids(list(stops)))
    gen.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def conv_dirs(tmp_path_factory):
    """Bases with chat tokens and a BOS convention; plain donors with the opposite one."""
    root = tmp_path_factory.mktemp("conv")
    spm, bpe = tiny.sentencepiece_tokenizer, tiny.byte_level_tokenizer
    return {
        # Gemma-like: adds <bos>, chat turns, stops on <eos> and <end_of_turn>.
        "gemma_chat": _make(root / "gemma_chat", spm(), tiny.tiny_gemma(500, tied=True, seed=4),
                            True, ["<start_of_turn>", "<end_of_turn>"], GEMMA_CHAT,
                            stops=["<end_of_turn>"]),
        "gemma_chat_untied": _make(root / "gemma_chat_untied", spm(),
                                   tiny.tiny_gemma(500, tied=False, seed=5), True,
                                   ["<start_of_turn>", "<end_of_turn>"], GEMMA_CHAT,
                                   stops=["<end_of_turn>"]),
        # SmolLM2-Instruct-like: no BOS, ChatML, eos is <|im_end|>.
        "llama_chatml": _make(root / "llama_chatml", bpe(), tiny.tiny_llama(400, tied=True, seed=6),
                              False, ["<|im_start|>", "<|im_end|>"], CHATML, eos="<|im_end|>"),
        "llama_chatml_untied": _make(root / "llama_chatml_untied", bpe(),
                                     tiny.tiny_llama(400, tied=False, seed=7), False,
                                     ["<|im_start|>", "<|im_end|>"], CHATML, eos="<|im_end|>"),
        # Plain donors whose own BOS habit is the opposite of the base they are paired with.
        "bpe_plain": _make(root / "bpe_plain", bpe(), tiny.tiny_llama(400, seed=8), False, [], None),
        "spm_bos": _make(root / "spm_bos", spm(), tiny.tiny_gemma(500, seed=9), True, [], None),
    }


PAIRS = [("gemma_chat", "bpe_plain"), ("gemma_chat_untied", "bpe_plain"),
         ("llama_chatml", "spm_bos"), ("llama_chatml_untied", "spm_bos")]


def _transplant(base, donor, out, **kw):
    return transplant(TransplantConfig(base=str(base), donor=str(donor), out=str(out), quiet=True,
                                       method="mean", holdout=0, **kw))


def _rows(model):
    head = model.get_output_embeddings().weight
    return model.get_input_embeddings().weight, head


@pytest.mark.parametrize("base_name,donor_name", PAIRS)
def test_output_frames_text_like_the_base(conv_dirs, tmp_path, base_name, donor_name):
    base_dir, donor_dir = conv_dirs[base_name], conv_dirs[donor_name]
    manifest = _transplant(base_dir, donor_dir, tmp_path / "out")
    base_tok, donor_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(donor_dir)
    out_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    base_prefix, _ = conventions.framing(base_tok)
    donor_prefix, _ = conventions.framing(donor_tok)
    out_prefix, out_suffix = conventions.framing(out_tok, "Natalia sold clips.")
    # The donor's own habit is the opposite: the output must follow the base, not the donor.
    assert bool(donor_prefix) != bool(base_prefix)
    assert len(out_prefix) == len(base_prefix) and out_suffix == []
    base, out = AutoModelForCausalLM.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    if base_prefix:  # the BOS the output adds stands on the base's BOS row, bit-exactly
        for b, o in zip(_rows(base), _rows(out)):
            assert torch.equal(o[out_prefix[0]], b[base_prefix[0]])
    assert manifest["conventions"]["add_bos"] == bool(base_prefix)


@pytest.mark.parametrize("base_name,donor_name", PAIRS)
def test_chat_and_stop_tokens_copied_bit_exactly(conv_dirs, tmp_path, base_name, donor_name):
    base_dir, donor_dir = conv_dirs[base_name], conv_dirs[donor_name]
    manifest = _transplant(base_dir, donor_dir, tmp_path / "out")
    base_tok, out_tok = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(tmp_path / "out")
    donor_vocab = AutoTokenizer.from_pretrained(donor_dir).get_vocab()
    conv = conventions.observe(base_tok, GenerationConfig.from_pretrained(base_dir))
    base, out = AutoModelForCausalLM.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    donor_tok = AutoTokenizer.from_pretrained(donor_dir)
    needed = [t for t in dict.fromkeys(conv.chat_tokens + conv.stops) if t not in donor_vocab
              and (t in conv.chat_tokens or conventions.resolve_token(conv, t, donor_tok) is None)]
    assert needed and sorted(manifest["conventions"]["added_tokens"]) == sorted(needed)
    out_vocab, base_vocab = out_tok.get_vocab(), base_tok.get_vocab()
    for token in needed:
        assert token in out_tok.all_special_tokens
        for b, o in zip(_rows(base), _rows(out)):
            assert torch.equal(o[out_vocab[token]], b[base_vocab[token]]), token
    # Chat template and generation stops are the base's, in the new vocabulary.
    assert out_tok.chat_template == base_tok.chat_template
    stops = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    for token in conv.stops:
        assert conventions.resolve_token(conv, token, out_tok) is not None
        assert out_vocab[conventions.resolve_token(conv, token, out_tok)] in stops
    assert out_tok.eos_token_id in stops
    # Every id whose row copies a base stop row stops too (a tied head gives it the same logit).
    embed_out, embed_base = _rows(out)[0], _rows(base)[0]
    for token in conv.stops:
        twins = (embed_out == embed_base[base_vocab[token]]).all(dim=1).nonzero().flatten().tolist()
        assert set(twins) <= set(stops), token
    # A chat prompt encodes its turn markers as single tokens.
    ids = out_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                      add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert out_vocab[conv.chat_tokens[0]] in ids


def test_donor_conventions_keep_the_donor_vocabulary(conv_dirs, tmp_path):
    base_dir, donor_dir = conv_dirs["llama_chatml"], conv_dirs["spm_bos"]
    manifest = _transplant(base_dir, donor_dir, tmp_path / "out", conventions="donor")
    donor_tok = AutoTokenizer.from_pretrained(donor_dir)
    out_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert out_tok.get_vocab() == donor_tok.get_vocab() and manifest["conventions"]["added_tokens"] == []
    assert conventions.framing(out_tok) == conventions.framing(donor_tok)


def test_resaving_keeps_every_stop_id(conv_dirs, tmp_path):
    """distill / spec outputs go through save_model with the input's tokenizer: the stop list
    in generation_config.json and the BOS habit must survive, not collapse to one eos id."""
    ref = modelio.resolve(str(conv_dirs["gemma_chat"]))
    model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
    before = GenerationConfig.from_pretrained(ref.directory).eos_token_id
    assert isinstance(before, list) and len(before) == 2
    modelio.save_model(model, tok, tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == before
    assert conventions.framing(AutoTokenizer.from_pretrained(tmp_path)) == conventions.framing(tok)


def test_gguf_framing_reads_add_bos_and_end_of_generation(tmp_path):
    gguf = pytest.importorskip("gguf")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>", "hello", "<|im_end|>"]
    types = [3, 3, 3, 2, 3, 1, 1]  # <|im_end|> is NORMAL here: a plain token, not a stop
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
                 writer.write_tensors_to_file):
        step()
    writer.close()
    assert modelio.gguf_framing(path) == {"add_bos": False, "add_eos": False, "stop_ids": [1, 4]}
    assert conventions.stop_tokens_from_gguf(tokens, types, None) == [4]


def test_eval_bos_modes(conv_dirs):
    segments = ["The quick brown fox jumps over the lazy dog.\n", "To be, or not to be.\n"]
    for name, adds in (("gemma_chat", True), ("llama_chatml", False)):
        ref = modelio.resolve(str(conv_dirs[name]))
        model, tok = modelio.load_model(ref), modelio.load_tokenizer(ref)
        auto, always, never = (bits_per_byte(model, tok, segments, bos=m) for m in
                               ("auto", "always", "never"))
        same = always if adds else never
        assert math.isclose(auto["bits_per_byte"], same["bits_per_byte"], rel_tol=1e-6)
        assert auto["bytes"] == same["bytes"]
        # Without a prefix the first token of each segment has no context: not scored, its
        # bytes not counted; with one, every byte is.
        assert always["bytes"] == sum(len(s.encode()) for s in segments)
        assert never["tokens"] == always["tokens"] - len(segments)
        ids, start, n_bytes = encode_segment(tok, segments[0], "never")
        first = len(tok.decode(ids[:1]).encode())
        assert start == 1 and n_bytes == len(segments[0].encode()) - first
        check = bos_check(model, tok, segments, 10_000)
        best = min(check["bpb_always"], check["bpb_never"])
        assert ("warning" in check) == (check["bpb_auto"] > best + 0.01 + 1e-4)
