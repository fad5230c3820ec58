"""bench/common.py: the benches' data root, input checks and config-derived flags."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

# Loaded from its file: bench/ is not put on sys.path, where bench/distill.py would shadow the
# distill package for later tests.
_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[1] / "bench" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

from spec_decode.bench import SpecBenchConfig
from tokensurgeon.errors import UsageError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_config_options(parser, SpecBenchConfig, common.SPEC_PROMPT_OPTIONS)
    common.add_data_root(parser)
    return parser.parse_args(argv)


def test_config_flags_keep_the_dataclass_defaults_and_parse_like_the_cli():
    args = parse([])
    values = common.resolve_options(args, SpecBenchConfig, common.SPEC_PROMPT_OPTIONS)
    default = SpecBenchConfig(target="t")
    assert values == {name: getattr(default, name) for name in common.SPEC_PROMPT_OPTIONS}
    args = parse(["--gamma", "2,4", "--max-tokens", "7"])
    values = common.resolve_options(args, SpecBenchConfig, common.SPEC_PROMPT_OPTIONS)
    assert values["gamma"] == [2, 4] and values["max_tokens"] == 7
    assert values["temperature"] == default.temperature
    with pytest.raises(SystemExit):
        parse(["--gamma", "two"])


def test_data_root_order_and_the_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(common.DATA_ENV, raising=False)
    assert common.data_root(parse([])) == common.VENDORED_DATA
    monkeypatch.setenv(common.DATA_ENV, str(tmp_path / "env"))
    assert common.data_root(parse([])) == tmp_path / "env"
    args = parse(["--data-root", str(tmp_path)])
    assert common.data_root(args) == tmp_path
    with pytest.raises(UsageError, match="gsm8k/test.jsonl not found") as err:
        common.require(args, [common.GSM8K_TEST])
    assert "\n" not in str(err.value) and "--data-root" in str(err.value)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("{}\n")
    assert common.require(args, [common.GSM8K_TEST]) == tmp_path


def test_the_vendored_data_holds_every_file_the_benches_read():
    vendored = argparse.Namespace(data_root=str(common.VENDORED_DATA))
    files = [common.GSM8K_TRAIN, common.GSM8K_TEST, common.PROSE, common.WIKITEXT_RAW,
             common.SHAKESPEARE]
    assert common.require(vendored, files) == common.VENDORED_DATA


def test_cli_flags_and_portable_paths():
    assert common.cli_flags({"k": 64, "centre": False, "untie": True, "grid": [0, 1]}) == [
        "--k", "64", "--no-centre", "--untie", "--grid", "0,1"]
    from tokensurgeon import modelio

    record = {"out": str(common.ROOT / "out" / "x"), "cache": str(modelio.cache_dir() / "m"),
              "n": [1, "builtin:smollm2-135m"]}
    assert common.portable(record) == {"out": "out/x", "cache": "$TOKENSURGEON_CACHE/m",
                                       "n": [1, "builtin:smollm2-135m"]}
