"""The shared registry: every table lists what its modules registered, and no name twice."""

import pytest
import torch
from safetensors import safe_open

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


@pytest.fixture
def scaled_mean_method():
    """A method registered by a test, with options of its own: rows are SCALE x the mean
    of BASE's anchor rows. Removed again afterwards."""
    from dataclasses import dataclass, field

    from tokensurgeon.methods import METHODS, MethodOptions, MethodResult, register_method

    @dataclass
    class ScaledOptions(MethodOptions):
        scale: float = field(default=2.0, metadata={"help": "factor on the anchor mean"})

    @register_method("scaled", ScaledOptions)
    def scaled_rows(problem):
        n = problem.donor_targets.shape[0]
        row = problem.base_anchors.mean(0) * problem.options.scale
        return MethodResult(row.expand(n, -1).clone(), ["scaled"] * n)

    try:
        yield
    finally:
        del METHODS["scaled"]


def test_a_new_method_brings_its_options_through_the_orchestrator(model_dirs, tmp_path,
                                                                  scaled_mean_method):
    """Registering a method and its options dataclass is all it takes: the transplant config
    gains --scale, the orchestrator hands it to the method, and the rows follow it."""
    import argparse

    from transformers import AutoModelForCausalLM

    from tokensurgeon.config import add_config_arguments, member_options, resolve_config
    from tokensurgeon.methods import METHODS
    from tokensurgeon.transplant import TransplantConfig, transplant

    config = member_options(METHODS, after="method")(TransplantConfig)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config)
    assert "--scale" in parser.format_help() and "--k" in parser.format_help()
    def run(scale: str) -> tuple[dict, torch.Tensor]:
        out = tmp_path / f"out{scale}"
        cfg = resolve_config(config, parser.parse_args([
            str(model_dirs["gemma_spm"]), str(model_dirs["llama_bpe"]), str(out), "--method",
            "scaled", "--scale", scale, "--quiet", "--holdout", "0", "--no-leak-check"]))
        assert (cfg.scale, cfg.k) == (float(scale), TransplantConfig().k)
        manifest = transplant(cfg)
        rows = AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.detach()
        return manifest, rows

    (_, one), (m3, three) = run("1"), run("3")
    assert m3["counts"]["approximated"]["scaled"] > 0 and m3["options"]["scale"] == 3.0
    with safe_open(str(tmp_path / "out3" / m3["per_token"]), framework="pt") as f:
        new, copied = f.get_tensor("new_donor_ids"), f.get_tensor("copied_donor_ids")
    assert new.numel() and torch.equal(three[copied], one[copied])
    torch.testing.assert_close(three[new], 3 * one[new])
    assert not torch.equal(three[new], one[new])
    # Re-applying adds only what is new, and a clash with a config field is refused at once.
    assert member_options(METHODS, after="method")(config).__dataclass_fields__.keys() \
        == config.__dataclass_fields__.keys()


def test_a_member_option_may_not_shadow_a_config_field():
    from dataclasses import dataclass, field

    from tokensurgeon.config import member_options

    @dataclass
    class Clash:
        seed: int = field(default=1, metadata={"help": "x"})

    class Member:
        options = Clash

    @dataclass
    class Config:
        method: str = field(default="m", metadata={"help": "x"})
        seed: int = field(default=0, metadata={"help": "x"})

    with pytest.raises(TypeError, match="clashes with the config's own field"):
        member_options({"m": Member()}, after="method")(Config)
