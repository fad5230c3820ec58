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
