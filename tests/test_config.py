"""ModelConfig validation: a bad field is rejected with a message that names it."""

import pytest

from minimamba_moe import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(top_k=5, n_experts=4), "top_k"),
        (dict(d_model=0), "d_model"),
        (dict(d_model=-3), "d_model"),
        (dict(d_model=2.5), "d_model"),
        (dict(layer_pattern=("mamba", "convolution")), "layer_pattern"),
        (dict(n_layer=3, layer_pattern=("mamba", "moe")), "n_layer"),
        (dict(mlp_activation="gelu"), "mlp_activation"),
        (dict(router="hash"), "router"),
        (dict(router="sinkhorn", capacity_factor=1.0), "capacity_factor"),
        (dict(router="switch", capacity_factor=0.0), "capacity_factor"),
        (dict(sinkhorn_init="random"), "sinkhorn_init"),
        (dict(sinkhorn_stopping="never"), "sinkhorn_stopping"),
        (dict(norm="batchnorm"), "norm"),
        (dict(final_norm="batchnorm"), "final_norm"),
        (dict(backend="cuda"), "backend"),
        (dict(layer_pattern=("attention",), d_model=30, n_head=4), "n_head"),
        (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    ],
)
def test_bad_field_is_named(fields, named):
    with pytest.raises(ConfigError, match=rf"ModelConfig\.{named} = "):
        ModelConfig(**fields)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ConfigError, match="blackmamba-1.5b"):
        ModelConfig.from_preset("blackmamba-1.5")


def test_unknown_field_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.from_dict({"n_expert": 8})


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    config = ModelConfig.from_preset(name)
    assert config.name == name
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_overrides_apply_and_are_validated():
    assert ModelConfig.from_preset("tiny", n_experts=8).n_experts == 8
    with pytest.raises(ConfigError, match="top_k"):
        ModelConfig.from_preset("tiny", top_k=9)
    assert ModelConfig(layer_pattern="mamba, moe").layer_pattern == ("mamba", "moe")
