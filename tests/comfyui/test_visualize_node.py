"""Visualize LoRA² Ranks called directly (no ComfyUI needed): files, adapter, info and history inputs."""
import pytest
import torch

from adapters import random_adapter


@pytest.fixture
def node(tmp_path, monkeypatch):
    from lora2_train.format import save_adapter
    from nodes import _pack
    from nodes.visualize import VisualizeLoRA2Ranks

    keys = {f"lora_unet_input_blocks_{b}_1_transformer_blocks_0_attn{a}_to_{p}": (64, 64)
            for b in (4, 5, 7) for a in (1, 2) for p in ("q", "k", "v")}
    save_adapter(random_adapter(keys, lambda i, k: 4 + 2 * i), tmp_path / "a.safetensors")
    monkeypatch.setattr(_pack, "lora_path", lambda name: str(tmp_path / name))
    return VisualizeLoRA2Ranks(), keys


def _chart(node, **kw):
    (image,) = node.visualize(**kw)
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    return image


def test_inputs_declare_the_shared_types():
    from nodes.visualize import VisualizeLoRA2Ranks

    opt = VisualizeLoRA2Ranks.INPUT_TYPES()["optional"]
    assert opt["adapter"] == ("LORA2",) and opt["info"] == ("LORA2_INFO",) and opt["history"] == ("LORA2_HISTORY",)


def test_history_adds_the_training_curve(node):
    vis, keys = node
    history = [{"step": s, "ranks": {k: 8 + (s // 10) * (i % 3) for i, k in enumerate(keys)}, "loss": 1.0 / (s + 1)}
               for s in range(0, 60, 10)]
    plain = _chart(vis, lora_name="a.safetensors")
    with_history = _chart(vis, lora_name="a.safetensors", history=history)
    assert with_history.shape[1] > plain.shape[1]  # one more panel: mean rank per block over the steps
    alone = _chart(vis, lora_name="(none)", history=history)  # history alone charts its last step too
    assert alone.shape[1] == with_history.shape[1]


def test_adapter_and_info_inputs(node):
    vis, keys = node
    ad = random_adapter(keys, lambda i, k: 16)
    one = _chart(vis, lora_name="(none)", adapter=ad)
    info = {"name": "a.safetensors", "ranks": {k: min(8, 4 + 2 * i) for i, k in enumerate(keys)},
            "full_ranks": {k: 4 + 2 * i for i, k in enumerate(keys)}}
    two = _chart(vis, lora_name="(none)", info=info)  # full vs budget: two series and the heat map
    assert two.shape[1] > one.shape[1]


def test_nothing_to_chart_is_a_clear_error(node):
    vis, _ = node
    with pytest.raises(ValueError, match="nothing to chart"):
        vis.visualize(lora_name="(none)")
