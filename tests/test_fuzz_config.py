"""Fuzzing option loading: any YAML file gives a mapping or a one-line UsageError, and the
same values given as flags or as YAML resolve to the same options (one conversion path)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli
from tokensurgeon.config import _field_type, _load_yaml, write_resolved_config
from tokensurgeon.errors import UsageError

CONFIGS = {name: command.config() for name, command in cli.COMMANDS.items()}
PARSER = cli.build_parser()
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_./", min_size=1, max_size=12)
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def value_strategy(cls, field):
    tp, is_list = _field_type(cls, field)
    choices = field.metadata.get("choices")
    if choices is not None and tp is not bool:
        one = st.sampled_from(sorted(choices() if callable(choices) else choices))
    elif tp is bool:
        one = st.booleans()
    elif tp is int:
        one = st.integers(-10**9, 10**9)
    elif tp is float:
        one = st.floats(allow_nan=False, allow_infinity=False, width=64)
    else:
        one = WORD.filter(lambda w: not w[0].isdigit())  # a digit-led word reads as a number
    return st.lists(one, min_size=1, max_size=3) if is_list else one


@st.composite
def command_and_values(draw):
    name = draw(st.sampled_from(sorted(CONFIGS)))
    cls = CONFIGS[name]
    fields = [f for f in dataclasses.fields(cls)]
    chosen = draw(st.lists(st.sampled_from(fields), unique_by=lambda f: f.name, max_size=8))
    return name, cls, {f.name: draw(value_strategy(cls, f)) for f in chosen}


def as_flags(cls, values):
    argv = []
    for f in dataclasses.fields(cls):
        if f.name not in values or f.metadata.get("positional"):
            continue
        tp, is_list = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        v = values[f.name]
        # FLAG=VALUE: argparse would read a separate "-1.5,2" as an unknown option.
        if tp is bool:
            argv.append(flag if v else "--no-" + f.name.replace("_", "-"))
        elif is_list and f.metadata.get("comma"):
            argv.append(f"{flag}={','.join(map(repr if tp is float else str, v))}")
        elif is_list:
            argv += [f"{flag}={repr(x) if tp is float else x}" for x in v]
        else:
            argv.append(f"{flag}={repr(v) if tp is float else v}")
    return argv


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@FUZZ
@given(command_and_values())
def test_yaml_and_flags_give_the_same_values(tmp_path, case):
    name, cls, values = case
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    from_yaml = _load_yaml(str(path), cls)
    positionals = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    argv = [*name.split(" "), *["X"] * len(positionals)] + as_flags(cls, values)
    ns = vars(PARSER.parse_args(argv))
    for key, value in values.items():
        assert same(from_yaml[key], value), (key, from_yaml[key], value)
        if not any(f.name == key for f in positionals):
            assert same(ns[key], value), (key, ns[key], value)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(CONFIGS)), st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["steps", "k", "data", "gamma", "quiet", "lr", "out", "x"]),
                    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                              st.lists(st.integers(), max_size=3), st.dictionaries(
                                  st.text(max_size=3), st.integers(), max_size=2)),
                    max_size=4).map(yaml.safe_dump)))
def test_any_yaml_file_loads_or_is_a_one_line_usage_error(tmp_path, name, text):
    path = tmp_path / "any.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        values = _load_yaml(str(path), CONFIGS[name])
    except UsageError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(values, dict)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_written_config_yaml_loads_back_unchanged(tmp_path, name):
    cls = CONFIGS[name]
    required = {f.name: (["x"] if _field_type(cls, f)[1] else "x")
                for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    cfg = cls(**required)
    write_resolved_config(tmp_path, cfg)
    loaded = _load_yaml(str(tmp_path / "config.yaml"), cls)
    assert cls(**loaded) == cfg
