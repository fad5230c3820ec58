"""The CLI is generated from the config dataclasses: every option is documented, YAML
config files supply values, and explicit flags override them."""

from __future__ import annotations

import dataclasses

import pytest

import cli
from tokensurgeon.config import resolve_config
from tokensurgeon.transplant import TransplantConfig


def test_every_command_has_help_for_every_option(capsys):
    for name, command in cli.COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*name.split(" "), "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(command.config()):
            shown = f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
            assert shown in out, (name, f.name)


def test_yaml_config_then_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("k: 12\nmethod: mean\ncandidates: 99\n")
    parser = cli.build_parser()
    args = parser.parse_args(["transplant", "a", "b", "c", "--config", str(cfg_file), "--k", "7"])
    cfg = resolve_config(TransplantConfig, args)
    assert (cfg.k, cfg.method, cfg.candidates) == (7, "mean", 99)
    assert cfg.batch_size == TransplantConfig().batch_size


def test_unknown_yaml_option_is_a_one_line_error(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("kay: 12\n")
    assert cli.main(["transplant", "a", "b", "c", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown options ['kay']" in err and len(err.splitlines()) == 1


def _resolve(argv, cls):
    return resolve_config(cls, cli.build_parser().parse_args(argv))


def test_yaml_values_are_converted_like_flags(tmp_path, capsys):
    from distill.trainer import DistillConfig

    good = tmp_path / "good.yaml"
    good.write_text("data: x.txt\nlr: 1e-4\nsteps: 30\nquiet: true\n")
    cfg = _resolve(["distill", "--teacher", "t", "--student", "s", "--out", "o",
                    "--config", str(good)], DistillConfig)
    assert cfg.data == ["x.txt"] and cfg.lr == 1e-4 and cfg.steps == 30 and cfg.quiet is True
    for text, needle in [("steps: '300'\n", "steps: 300"), ("steps: 2.5\n", "an integer"),
                         ("train: nope\n", "not one of"), ("lr: [1, 2]\n", "one value"),
                         ("debias: 'yes'\n", "true or false"), ("steps:\n", "empty"),
                         ("steps: 3\n  x: : y\n", "line 2")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        code = cli.main(["distill", "--teacher", "t", "--student", "s", "--out", "o",
                         "--config", str(bad)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (text, err)


def test_comma_options_are_real_lists(tmp_path):
    from spec_decode.bench import SpecBenchConfig

    base = ["spec", "bench", "T", "--draft", "D", "--prompts", "p.txt"]
    cfg = _resolve(base + ["--gamma", "2,3", "--temperature", "0,0.5", "--batch-size", "4"],
                   SpecBenchConfig)
    assert (cfg.gamma, cfg.temperature, cfg.batch_size) == ([2, 3], [0.0, 0.5], [4])
    y = tmp_path / "b.yaml"
    y.write_text("gamma: [2, 5]\ntemperature: '0,1'\nbatch_size: 8\n")
    cfg = _resolve(base + ["--config", str(y)], SpecBenchConfig)
    assert (cfg.gamma, cfg.temperature, cfg.batch_size) == ([2, 5], [0.0, 1.0], [8])
    assert SpecBenchConfig(target="T").gamma == [2, 3, 4]


def test_usage_errors_are_one_line(capsys):
    for argv in (["spec", "bench", "T", "--gamma", "2,x"], ["transplant", "--k", "x"],
                 ["nope"], ["distill", "--draft-sample", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert "--help" in err


def test_quiet_from_yaml_is_honoured(tmp_path, monkeypatch):
    from tokensurgeon import progress

    seen = []

    class Spy(progress.Progress):
        def __init__(self, quiet=False, **kw):
            seen.append(quiet)
            super().__init__(quiet=quiet, **kw)

    monkeypatch.setattr(progress, "Progress", Spy)
    y = tmp_path / "q.yaml"
    y.write_text("quiet: true\n")
    assert cli.main(["eval", str(tmp_path / "none"), str(tmp_path / "none.txt"),
                     "--config", str(y)]) == 2
    assert seen == [True]


def test_one_logit_chunk_default():
    from distill.losses import LossSettings
    from distill.trainer import DistillConfig
    from tokensurgeon.evaluate import EvalConfig
    from tokensurgeon.logits import LOGIT_CHUNK

    defaults = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    assert defaults["logit_chunk"] == LossSettings().logit_chunk == LOGIT_CHUNK
    assert {f.name: f.default for f in dataclasses.fields(EvalConfig)}["logit_chunk"] == LOGIT_CHUNK


def test_loss_help_lists_the_registry(capsys):
    from distill.losses import LOSSES

    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in LOSSES.names():
        assert name in out.split("[names:")[1], name


def test_transplant_and_make_draft_write_their_resolved_options(tmp_path, model_dirs):
    """OUT/config.yaml holds every resolved option and reproduces the run via --config."""
    import yaml

    out = tmp_path / "t"
    assert cli.main(["transplant", str(model_dirs["gemma_spm"]), str(model_dirs["llama_bpe"]),
                     str(out), "-k", "4", "--holdout", "0", "--quiet"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["k"] == 4 and saved["out"] == str(out)
    again = resolve_config(TransplantConfig, cli.build_parser().parse_args(
        ["transplant", "--config", str(out / "config.yaml")]))
    assert dataclasses.asdict(again) == saved
    draft = tmp_path / "d"
    assert cli.main(["spec", "make-draft", str(model_dirs["llama_bpe"]), "--keep-layers", "0",
                     "--out", str(draft), "--quiet"]) == 0
    assert yaml.safe_load((draft / "config.yaml").read_text())["keep_layers"] == "0"


def test_version_comes_from_the_package_metadata(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokensurgeon {version('tokensurgeon')}"


def test_transplant_summary_names_models_as_typed_and_says_how_to_use_out(
        tmp_path, model_dirs, capsys, monkeypatch):
    monkeypatch.chdir(model_dirs["gemma_spm"].parent)  # relative names, as a user types them
    capsys.readouterr()
    assert cli.main(["transplant", "gemma_spm", "llama_bpe", str(tmp_path / "t"), "-k", "4",
                     "--holdout", "16", "--quiet"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"wrote {tmp_path / 't'}: gemma_spm with the tokenizer of llama_bpe"
    assert str(model_dirs["gemma_spm"]) not in out  # no resolved (cache) paths
    assert not any(line.rstrip().endswith(",") for line in lines), out
    assert "0 = exact; the anchor mean scores" in out and "(1 = exact)" in out
    assert any(line.startswith(f"{tmp_path / 't'} holds ") for line in lines), out
    use = lines[lines.index("use it:"):]
    assert any(f"tokensurgeon eval {tmp_path / 't'}" in line for line in use)
    assert any("AutoModelForCausalLM.from_pretrained(" in line for line in use)
    assert any(f"vllm serve {tmp_path / 't'}" in line for line in use)


def test_transplant_summary_without_new_tokens_has_no_dangling_comma():
    manifest = {"options": {"out": "o", "base": "builtin:gemma3-270m", "donor": "d"},
                "counts": {"copied": 400, "approximated": {}}, "vocab_size": 400,
                "matrices": {"embed": {}}, "seconds": {"total": 1.0}, "device": "cpu",
                "threads": 2}
    text = cli._render_transplant(manifest)
    assert "vocabulary 400: all 400 copied exactly (no new tokens)" in text
    assert "builtin:gemma3-270m" in text and ", \n" not in text and not text.endswith(", ")


@pytest.mark.parametrize("keep", [False, True])
def test_distill_summary_says_what_out_kept(tmp_path, model_dirs, capsys, keep):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog.\n" * 20)
    out = tmp_path / "o"
    capsys.readouterr()
    assert cli.main(["distill", "--teacher", str(model_dirs["llama_bpe"]), "--student",
                     str(model_dirs["llama_bpe"]), "--data", str(data), "--out", str(out),
                     "--loss", "sft", "--steps", "2", "--checkpoint-every", "1",
                     "--batch-size", "1", "--max-length", "16", "--quiet"]
                    + (["--keep-checkpoints"] if keep else [])) == 0
    text = capsys.readouterr().out
    assert (out / "checkpoints").is_dir() == keep
    if keep:
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
        assert "of which checkpoints/ (step-1, step-2)" in text, text
    else:
        assert "checkpoints were removed" in text and "--keep-checkpoints" in text, text
    assert f"{out} holds " in text and f"vllm serve {out}" in text
