"""The shared registry: every table lists what its modules registered, and no name twice."""

import pytest

from spec_decode.backends import backend_names
from spec_decode.divergences import divergence_names
from tokensurgeon.methods import method_names
from tokensurgeon.registry import Registry


def test_tables_list_their_modules():
    assert method_names() == ["mean", "omp", "subword", "zero"]
    assert divergence_names() == ["fkl", "jsd", "rkl", "tvd"]
    assert backend_names() == ["hf", "vllm"]


def test_a_name_registers_once():
    table: Registry[int] = Registry("thing")
    table.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        table.register("a")(2)
    assert table == {"a": 1} and table.names() == ["a"]
