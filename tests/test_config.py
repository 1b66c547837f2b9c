import json

import pytest
import torch

import lora_lite as ll


def test_config_is_typed_and_validated():
    cfg = ll.config("lora", r=4, alpha=8, target_names=["q_proj$"], dtype="bfloat16")
    assert type(cfg).__name__ == "LoRAConfig" and cfg.dtype is torch.bfloat16
    assert cfg.target_names == ("q_proj$",) and cfg.scale == 2.0


@pytest.mark.parametrize("field,value", [
    ("r", 0), ("r", -3), ("r", 2.5), ("alpha", "big"), ("dtype", "int8"),
    ("target_roles", ("reader", "sideways")), ("target_names", ["(unclosed"]),
    ("layers", [-1]),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ll.ConfigError, match=field):
        ll.config("lora", **{field: value})


def test_unknown_field_is_named():
    with pytest.raises(ll.ConfigError, match="rank.*known fields"):
        ll.config("lora", rank=4)


def test_unknown_variant_suggests_installed_names_never_a_guessed_package(only_plugins):
    only_plugins("lora-lite-lora,lora-lite-hra")
    with pytest.raises(ll.VariantNotInstalled) as err:
        ll.config("hrra")
    assert "did you mean 'hra'?" in str(err.value)
    assert "pip install" not in str(err.value)  # lora-lite-hrra could be squatted
    with pytest.raises(KeyError) as err:
        ll.config("nosuch")
    assert "did you mean" not in str(err.value) and "pip install" not in str(err.value)
    assert "Installed variants: hra, lora" in str(err.value)


def test_json_round_trip():
    cfg = ll.config("lora", r=4, alpha=8, target_names=["q_proj$", "v_proj$"], layers=[0, 1],
                    dtype=torch.float16, seed=3)
    text = cfg.to_json()
    back = ll.AdapterConfig.from_json(text)
    assert back == cfg and type(back) is type(cfg)
    assert json.loads(text)["dtype"] == "float16"


def test_from_dict_rejects_unknown_fields():
    d = ll.config("lora").to_dict()
    d["bogus"] = 1
    with pytest.raises(ll.ConfigError, match="bogus"):
        ll.AdapterConfig.from_dict(d)
