"""Every kohya key our trainer writes is mapped by ComfyUI's LoRA key map and patches W + strength·ΔW.

Runs in this process against the vendored ComfyUI's own model classes, built on the meta device (names and
shapes of the full SDXL: UNet with attention, ff, proj and resnet targets, both text encoders).
"""
import json
import math

import pytest
import torch
from safetensors import safe_open

import comfy_inprocess as C
from adapters import ALL_GROUPS, random_adapter, ragged_ranks, trainer_keys

PREFIX_TO_ROOT = {"lora_unet_": "diffusion_model.", "lora_te1_": "clip_l.transformer.",
                  "lora_te2_": "clip_g.transformer."}


@pytest.fixture(scope="module")
def sdxl(comfyui_dir):
    return C.meta_models(comfyui_dir, "sdxl")


@pytest.fixture(scope="module")
def koala(comfyui_dir):
    return C.meta_models(comfyui_dir, "koala-700m")


def _weight_shapes(model, clip):
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()})
    return shapes


@pytest.mark.parametrize("arch", ["sdxl", "koala-700m"])
def test_every_trainer_key_maps_to_its_weight(arch, sdxl, koala):
    from nodes.load import lora_key_map

    model, clip = sdxl if arch == "sdxl" else koala
    keys = trainer_keys(arch, ALL_GROUPS)
    counts = {p: sum(k.startswith(p) for k in keys) for p in PREFIX_TO_ROOT}
    # te1: 12 layers × 6, te2: 32 layers × 6; the UNet preset "all" covers attention, ff, proj and resnet convs
    assert counts["lora_te1_"] == 72 and counts["lora_te2_"] == 192
    n_attn = sum("_attn1_" in k or "_attn2_" in k for k in keys)
    assert n_attn == (560 if arch == "sdxl" else 168)
    key_map = lora_key_map(model, clip)
    shapes = _weight_shapes(model, clip)
    missing = [k for k in keys if k not in key_map]
    assert not missing, f"{len(missing)} keys unmapped, e.g. {missing[:5]}"
    for k, shape in keys.items():
        prefix = next(p for p in PREFIX_TO_ROOT if k.startswith(p))
        target = key_map[k]
        assert isinstance(target, str) and target.startswith(PREFIX_TO_ROOT[prefix]), (k, target)
        # the kohya name is the weight's module path with '.' → '_'
        assert target[len(PREFIX_TO_ROOT[prefix]):-len(".weight")].replace(".", "_") == k[len(prefix):], (k, target)
        assert shapes[target][0] == shape[0] and math.prod(shapes[target]) == math.prod(shape), (k, target)


def _one_per_kind(keys):
    """A sample of keys: each component kind under each prefix (3×3 and 1×1 convolutions included)."""
    import re

    picked = {}
    for k, shape in keys.items():
        m = re.search(r"(attn[12]_to_\w+|ff_net_\w+|proj_(in|out)|in_layers_2|out_layers_3|skip_connection|"
                      r"self_attn_\w+|mlp_fc\d)$", k)
        picked.setdefault((k.split("_")[1], m.group(1) if m else k, len(shape)), k)
    return {k: keys[k] for k in picked.values()}


def _expected(weight, module, strength):
    return weight + strength * module.delta_weight().reshape(weight.shape)


def test_patched_weight_is_w_plus_strength_delta(sdxl):
    from nodes.load import lora_key_map, patch_with_adapter

    model, clip = sdxl
    keys = _one_per_kind(trainer_keys("sdxl", ALL_GROUPS))
    assert any(len(s) == 4 and s[-1] == 3 for s in keys.values()) and any(k.startswith("lora_te2_") for k in keys)
    adapter = random_adapter(keys, ragged_ranks(4, 64, 4), seed=1)
    new_model, new_clip = patch_with_adapter(model, clip, adapter, 0.7, -0.4)
    assert not model.patches and not clip.patcher.patches, "the input MODEL/CLIP must stay unpatched"
    key_map = lora_key_map(model, clip)
    shapes = _weight_shapes(model, clip)
    g = torch.Generator().manual_seed(0)
    for k, m in adapter.modules.items():
        target = key_map[k]
        on_clip = not target.startswith("diffusion_model.")
        patcher = new_clip.patcher if on_clip else new_model
        w = torch.randn(shapes[target], generator=g)
        got = C.calculate_weight(patcher, target, w.clone())
        torch.testing.assert_close(got, _expected(w, m, -0.4 if on_clip else 0.7), rtol=1e-4, atol=1e-4,
                                   msg=lambda s: f"{k} → {target}: {s}")


def test_rank_budget_patches_the_truncated_adapter(sdxl, tmp_path, monkeypatch):
    from lora2_train.format import save_adapter
    from lora2_train.tools import truncate
    from nodes import _pack
    from nodes.load import LoadLoRA2Adapter, lora_key_map

    model, clip = sdxl
    keys = _one_per_kind(trainer_keys("sdxl", ("attn1", "attn2", "ff", "te_attn")))
    adapter = random_adapter(keys, ragged_ranks(4, 64, 4), seed=2)
    save_adapter(adapter, tmp_path / "a.safetensors", dtype="fp32")
    monkeypatch.setattr(_pack, "lora_path", lambda name: str(tmp_path / name))
    out = LoadLoRA2Adapter().load(model, clip, "a.safetensors", 1.0, 1.0, 12, "max rank")
    new_model, new_clip, info = out["result"]
    assert out["ui"]["lora2_ranks"][0]["ranks"] == info["ranks"]  # what the browser's rank chart draws
    assert info["ranks"] == {k: min(r, 12) for k, r in adapter.ranks().items()}
    assert info["full_ranks"] == adapter.ranks() and info["num_parameters"] < info["full_num_parameters"]
    json.dumps(info)  # LORA2_INFO is plain data
    cut = truncate(adapter, max_rank=12)
    key_map = lora_key_map(model, clip)
    shapes = _weight_shapes(model, clip)
    for k, m in cut.modules.items():
        target = key_map[k]
        patcher = new_model if target.startswith("diffusion_model.") else new_clip.patcher
        w = torch.zeros(shapes[target])
        torch.testing.assert_close(C.calculate_weight(patcher, target, w.clone()), _expected(w, m, 1.0),
                                   rtol=1e-4, atol=1e-4)


def test_unmapped_and_misshapen_keys_are_errors_naming_them(koala):
    from lora2_train.format import LoRAModule
    from nodes.load import patch_with_adapter

    model, clip = koala
    sdxl_only = "lora_unet_output_blocks_8_1_transformer_blocks_9_attn1_to_q"  # SDXL has it, KOALA does not
    keys = trainer_keys("koala-700m", ("attn1",))
    adapter = random_adapter(dict(list(keys.items())[:3]), lambda i, k: 4)
    adapter.modules[sdxl_only] = LoRAModule(torch.zeros(4, 1280), torch.zeros(1280, 4), 4.0)
    adapter.modules["lora_unet_not_a_module"] = LoRAModule(torch.zeros(4, 8), torch.zeros(8, 4), 4.0)
    with pytest.raises(ValueError, match="2 of 5 LoRA keys name no weight") as e:
        patch_with_adapter(model, clip, adapter, 1.0, 1.0, "x.safetensors")
    assert sdxl_only in str(e.value) and "lora_unet_not_a_module" in str(e.value) and "x.safetensors" in str(e.value)
    assert "\n" not in str(e.value)

    key = next(iter(keys))
    bad = random_adapter({key: (keys[key][0], keys[key][1] + 1)}, lambda i, k: 4)
    with pytest.raises(ValueError, match="do not fit") as e:
        patch_with_adapter(model, clip, bad, 1.0, 1.0, "y.safetensors")
    assert key in str(e.value)


def test_test_checkpoint_is_detected_as_koala_700m(comfyui_dir, koala_checkpoint):
    C.import_comfy(comfyui_dir)
    import comfy.model_detection
    import comfy.supported_models as sm

    with safe_open(str(koala_checkpoint), framework="pt") as f:
        sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    assert type(config) is sm.KOALA_700M
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.31.") for k in sd)
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.11.") for k in sd)
    assert any(k.startswith("first_stage_model.decoder.") for k in sd)
