"""Teacher cache and the fused logits path: the cached/fused losses equal the online ones,
a cache made for other inputs is refused in one line, and a half-written one is not used."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from loss_fixtures import loss_inputs

import cli
from distill.losses import LOSSES, side_statistics
from tokensurgeon.errors import UsageError
from tokensurgeon.teacher_cache import MANIFEST, TeacherCache


@pytest.fixture(scope="module")
def models(bpe_tokenizer):
    return {"llama": tiny.tiny_llama(len(bpe_tokenizer), seed=0)}


def losses(x, names=("alm", "sft")) -> dict[str, float]:
    return {n: float(LOSSES[n].total(x).detach()) / max(LOSSES[n].count(x), 1) for n in names}


def student_grad(x, student) -> torch.Tensor:
    student.zero_grad()
    sum(LOSSES[n].total(x) for n in ("alm", "sft")).backward()
    return torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])


@pytest.mark.parametrize("debias", [True, False])
def test_fused_path_equals_checkpointed_path(models, bpe_tokenizer, spm_tokenizer, debias):
    student = tiny.tiny_gemma(len(spm_tokenizer), seed=3)
    runs = {}
    for fused in (False, True):
        x = loss_inputs(models["llama"], bpe_tokenizer, student, spm_tokenizer, fused=fused,
                        debias=debias, student_boundary=debias)
        runs[fused] = (losses(x), student_grad(x, student))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5, abs=1e-7)
    fused, reference = runs[True][1], runs[False][1]
    # float32 gradients that sum many positions: compare against the gradient's own scale
    # (max |g| ~ 13 here; the two paths differ by ~3e-7 of it, thread count included).
    scale = float(reference.abs().max())
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-6 * scale)
    assert float((fused - reference).norm() / reference.norm()) < 1e-5
    assert scale > 0


def test_cached_teacher_gives_the_online_loss(models, bpe_tokenizer, spm_tokenizer):
    student = tiny.tiny_gemma(len(spm_tokenizer), seed=3)
    online = loss_inputs(models["llama"], bpe_tokenizer, student, spm_tokenizer)
    expected, expected_grad = losses(online), student_grad(online, student)
    # The cache stores each example's statistics computed on its own (another batch shape).
    per_example = []
    for row in range(online.teacher.ids.shape[0]):
        one = loss_inputs(models["llama"], bpe_tokenizer, student, spm_tokenizer,
                          texts=[__import__("loss_fixtures").TEXTS[row]])
        with torch.no_grad():
            r, b = side_statistics(one.teacher, one.settings, True)
        n = int(one.teacher.mask.sum())
        per_example.append((r[0, :n], b[0, :n]))
    cached = loss_inputs(models["llama"], bpe_tokenizer, student, spm_tokenizer)
    cached.teacher.hidden = None  # the teacher is not run
    cached.set_teacher_stats(per_example)
    assert losses(cached) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(student_grad(cached, student), expected_grad, rtol=1e-4,
                               atol=1e-6)


def stats(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3 + i, generator=g), torch.randn(3 + i, generator=g)) for i in range(n)]


def test_cache_serves_what_it_stored_and_computes_once(tmp_path):
    data = stats(5, 0)
    calls = []

    def compute(indices):
        calls.append(list(indices))
        return [data[i] for i in indices]

    cache = TeacherCache(tmp_path / "c", "teacher", "data", {"o": 1}, 5, shard_size=2)
    got = cache.get([4, 0, 1], compute)
    assert calls == [[4, 0, 1]]  # every missing shard in one call
    for (r, b), i in zip(got, [4, 0, 1]):
        assert torch.equal(r, data[i][0]) and torch.equal(b, data[i][1])
    again = TeacherCache(tmp_path / "c", "teacher", "data", {"o": 1}, 5, shard_size=2)
    assert again.fill(compute) == 2 and calls[-1] == [2, 3]  # only the missing shard
    got = again.get([3, 1], lambda _: pytest.fail("computed a cached shard"))
    assert torch.equal(got[0][0], data[3][0]) and torch.equal(got[1][1], data[1][1])


@pytest.mark.parametrize("what", ["teacher", "data", "options"])
def test_cache_made_for_other_inputs_is_a_one_line_error(tmp_path, what):
    TeacherCache(tmp_path / "c", "teacher", "data", {"o": 1}, 5).fill(lambda i: stats(len(i), 0))
    kwargs = {"teacher": "teacher", "data": "data", "options": {"o": 1}}
    kwargs[what] = {"o": 2} if what == "options" else "other"
    with pytest.raises(UsageError) as err:
        TeacherCache(tmp_path / "c", num_examples=5, **kwargs)
    assert what in str(err.value) and "\n" not in str(err.value)


def test_shard_of_another_cache_is_refused(tmp_path):
    TeacherCache(tmp_path / "a", "t", "d", {}, 2).fill(lambda i: stats(len(i), 0))
    TeacherCache(tmp_path / "b", "t", "other", {}, 2)
    (tmp_path / "a" / "shard-00000.safetensors").rename(tmp_path / "b" / "shard-00000.safetensors")
    with pytest.raises(UsageError, match="another teacher cache"):
        TeacherCache(tmp_path / "b", "t", "other", {}, 2).get([0], lambda i: stats(len(i), 1))


def test_half_written_cache_is_not_used(tmp_path):
    cache = TeacherCache(tmp_path / "c", "t", "d", {}, 4, shard_size=2)
    cache.get([0], lambda i: stats(len(i), 0))
    # A run killed while writing shard 1 leaves only its temporary file.
    (tmp_path / "c" / ".shard-00001.safetensors.999.tmp").write_bytes(b"\x00" * 17)
    computed = []
    fresh = TeacherCache(tmp_path / "c", "t", "d", {}, 4, shard_size=2)
    fresh.get([2, 3], lambda i: computed.append(i) or stats(len(i), 1))
    assert computed == [[2, 3]]
    # A killed first run that wrote no manifest leaves nothing that is trusted either.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / f".{MANIFEST}.1.tmp").write_text("{")
    TeacherCache(tmp_path / "d", "t", "d", {}, 4)
    assert json.loads((tmp_path / "d" / MANIFEST).read_text())["teacher"] == "t"


def test_distill_with_teacher_cache_equals_online(model_dirs, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(tiny.corpus(4)))

    def run(out, *extra):
        assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                         str(model_dirs["gemma_spm"]), "--data", str(data), "--out", str(out),
                         "--batch-size", "2", "--max-length", "48", "--steps", "2",
                         "--quiet", *extra]) == 0
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    online = run(tmp_path / "online", "--logits", "checkpoint")
    cache = tmp_path / "cache"
    first = run(tmp_path / "first", "--teacher-cache", str(cache))
    assert any(cache.glob("shard-*.safetensors"))
    second = run(tmp_path / "second", "--teacher-cache", str(cache))
    for a, b, c in zip(online, first, second):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert c["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert b["units_alm"] == a["units_alm"]
    other = tmp_path / "other.txt"
    other.write_text("\n".join(tiny.corpus(4)[::-1]) + "\nmore text here\n")
    assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                     str(model_dirs["gemma_spm"]), "--data", str(other), "--out",
                     str(tmp_path / "x"), "--batch-size", "2", "--max-length", "48",
                     "--steps", "1", "--quiet", "--teacher-cache", str(cache)]) != 0
