import pytest

from lora2_train.config import ConfigError, LoRA2Config


@pytest.mark.parametrize("field,value", [
    ("q", 0.0), ("q", 1.0), ("q", 1.5), ("q", float("nan")),
    ("r_target", 1024), ("r_init", 0), ("r_max", 0), ("r_min", 600),
    ("lambda_r", -1.0), ("lambda_e", -0.1), ("beta", -1e-3), ("lr", 0.0), ("nu_lr", -1.0),
    ("steps", 0), ("batch_size", 0), ("optimizer", "sgd"), ("mixed_precision", "fp8"),
    ("targets", ("attn3",)), ("targets", "nonsense"), ("resize_every", 0), ("lr", "fast"),
])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ConfigError) as e:
        LoRA2Config(**{field: value})
    assert f"LoRA2Config.{field}" in str(e.value) or "targets" in str(e.value)
    assert "\n" not in str(e.value)


def test_roundtrip_and_presets():
    c = LoRA2Config(targets="attn+ff", r_target=32)
    assert c.targets == ("attn1", "attn2", "ff")
    assert LoRA2Config.from_dict(c.to_dict()) == c
    assert LoRA2Config(targets="attn1,resnet").targets == ("attn1", "resnet")
    with pytest.raises(ConfigError, match="no field 'rank'"):
        LoRA2Config.from_dict({"rank": 4})
