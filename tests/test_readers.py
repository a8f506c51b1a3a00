"""Interoperability with real third-party code from PyPI: diffusers loads our files and adapts the
UNet by exactly our ΔW; files saved by diffusers/PEFT and by LyCORIS are read, padded, merged and
inspected correctly."""
import copy
import functools

import pytest
import torch
import torch.nn as nn

from lora2_train.config import LoRA2Config
from lora2_train.format import AdapterFormatError, adapter_from_network, load_adapter, save_adapter
from lora2_train.naming import diffusers_to_ldm, kohya_key, text_encoder_path
from lora2_train.network import LoRA2Network
from lora2_train.tools import inspect_adapter, merge, pad
from tests_helpers import diffusers_sdxl_like, tiny_clip_text_model


def diffusers_kohya_key(path: str, n: int = 2) -> str:
    """kohya key (ldm layout) of a diffusers UNet module path."""
    return kohya_key(diffusers_to_ldm(path, n, up_has_attention={0: True, 1: True}))


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 6, 64, generator=g)
    cond = {"text_embeds": torch.randn(2, 80, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, added_cond_kwargs=cond).sample


def ragged_lora2_file(tmp_path, ldm, targets="attn"):
    cfg = LoRA2Config(r_init=8, r_target=8, r_max=32, targets=targets)
    net = LoRA2Network(cfg, ldm)
    with torch.no_grad():
        for i, layer in enumerate(net.layers.values()):
            layer.resize(2 + 3 * (i % 4))
            layer.lora_up.normal_(std=0.1)
    return save_adapter(adapter_from_network(net, cfg), tmp_path / "lora2.safetensors", dtype="fp32")


def test_diffusers_loads_a_lora2_file_and_adapts_by_our_delta_w(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    diff, ldm = diffusers_sdxl_like()
    path = ragged_lora2_file(tmp_path, ldm)
    ours = load_adapter(path)
    assert len(set(ours.ranks().values())) == 4

    reference = copy.deepcopy(diff)
    patched = 0
    with torch.no_grad():
        for name, mod in reference.named_modules():
            if isinstance(mod, nn.Linear) and (".attn1." in name or ".attn2." in name):
                key = diffusers_kohya_key(name)
                if key in ours.modules:
                    mod.weight += ours.modules[key].delta_weight()
                    patched += 1
    assert patched == len(ours.modules)

    sd, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=diff.config)
    StableDiffusionXLPipeline.load_lora_into_unet(sd, alphas, diff)
    base = unet_output(diffusers_sdxl_like()[0])
    got, want = unet_output(diff), unet_output(reference)
    assert (got - base).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def peft_file(tmp_path):
    """An SDXL LoRA saved by diffusers from PEFT-injected UNet and text encoder (ragged via rank_pattern)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    diff, _ = diffusers_sdxl_like()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_v": 3}, init_lora_weights=False)
    diff.add_adapter(cfg)
    te = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False), tiny_clip_text_model())
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(diff),
        text_encoder_lora_layers=get_peft_model_state_dict(te), unet_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_adapter_metadata=LoraConfig(r=3, lora_alpha=6).to_dict())
    return tmp_path / "peft" / "pytorch_lora_weights.safetensors", diff, te


def peft_delta(layer) -> torch.Tensor:
    return layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]


def test_diffusers_peft_file_is_read_with_its_ranks_and_alphas(tmp_path):
    path, diff, te = peft_file(tmp_path)
    ad = load_adapter(path)
    assert ad.source == "peft"
    checked = 0
    for name, mod in list(diff.named_modules()) + [("te:" + n, m) for n, m in te.named_modules()]:
        if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
            continue
        if name.startswith("te:"):
            key = "lora_te1_" + text_encoder_path(name[3:]).replace(".", "_")
        else:
            key = diffusers_kohya_key(name)
        m = ad.modules[key]
        assert m.rank == mod.lora_A["default"].weight.shape[0]
        assert torch.allclose(m.delta_weight(), peft_delta(mod), atol=1e-6), key
        checked += 1
    assert checked == len(ad.modules) > 200
    assert sorted(set(ad.ranks().values())) == [2, 3, 4]
    info = inspect_adapter(ad)
    assert info["totals"]["params"] == ad.num_parameters() and info["source"] == "peft"
    padded = pad(ad)
    assert set(padded.ranks().values()) == {4}
    for k, m in ad.modules.items():
        assert torch.equal(padded.modules[k].delta_weight(), m.delta_weight())


def lycoris_file(tmp_path, use_tucker=False, algo="locon", name="locon"):
    from lycoris.kohya import create_network

    diff, _ = diffusers_sdxl_like()
    torch.manual_seed(1)
    preset = tmp_path / "preset.toml"  # the UNet's attention and ResNet blocks (the 'full' preset adds timestep layers)
    preset.write_text('unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]\n'
                      'unet_target_name = []\n')
    net = create_network(1.0, 4, 2.0, None, None, diff, algo=algo, conv_dim=3, conv_alpha=1.5,
                         use_tucker=use_tucker, warn_on_unmatched=False, preset=str(preset))
    net.apply_to(None, diff, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.1)
    path = tmp_path / f"{name}.safetensors"
    net.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    return path, net


def lycoris_deltas(net) -> dict:
    out = {}
    for lora in net.unet_loras:
        out[lora.lora_name] = lora.get_diff_weight(multiplier=1.0, shape=lora.shape)[0]
    return out


@pytest.mark.parametrize("use_tucker", [False, True])
def test_lycoris_locon_is_read_padded_merged_and_inspected(tmp_path, use_tucker):
    path, net = lycoris_file(tmp_path, use_tucker)
    ad = load_adapter(path)
    assert ad.source == "lycoris"
    deltas = lycoris_deltas(net)
    assert len(deltas) == len(ad.modules)
    convs = 0
    for lyco_name, d in deltas.items():
        m = ad.modules[_kohya_diffusers_to_ldm()[lyco_name]]
        assert torch.allclose(m.delta_weight(), d.reshape(m.delta_weight().shape), atol=1e-5), lyco_name
        convs += m.down.dim() == 4 and m.down.shape[-1] == 3
    assert convs > 10  # LoCon: 3×3 convs of the ResNet blocks
    padded = pad(ad)
    for k, m in ad.modules.items():
        assert torch.equal(padded.modules[k].delta_weight(), m.delta_weight())
    doubled = merge([ad, padded], weights=[0.5, 0.5])
    for k, m in ad.modules.items():
        assert torch.allclose(doubled.modules[k].delta_weight(), m.delta_weight(), atol=1e-5)
    assert inspect_adapter(ad)["totals"]["modules"] == len(deltas)


@functools.lru_cache(maxsize=1)
def _kohya_diffusers_to_ldm() -> dict:
    """lora_unet_down_blocks_1_attentions_0_… → the ldm kohya key, through the dotted diffusers paths."""
    diff, _ = diffusers_sdxl_like()
    table = {}
    for n, mod in diff.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            try:
                table["lora_unet_" + n.replace(".", "_")] = diffusers_kohya_key(n)
            except KeyError:  # layers with no ldm counterpart are not adapted in these tests
                pass
    return table


@pytest.mark.parametrize("algo,word", [("loha", "LoHa"), ("lokr", "LoKr"), ("full", "full weight difference")])
def test_other_lycoris_algorithms_are_refused_by_name(tmp_path, algo, word):
    path, _ = lycoris_file(tmp_path, algo=algo, name=algo)
    with pytest.raises(AdapterFormatError, match=word):
        load_adapter(path)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    _, ldm = diffusers_sdxl_like()
    path = ragged_lora2_file(tmp_path, ldm, targets="attn+ff+proj")
    a = load_adapter(path)
    b = load_adapter(save_adapter(a, tmp_path / "again.safetensors", dtype=None))
    assert a.metadata == b.metadata and a.ranks() == b.ranks()
    for k in a.modules:
        assert torch.equal(a.modules[k].down, b.modules[k].down) and torch.equal(a.modules[k].up, b.modules[k].up)
        assert a.modules[k].alpha == b.modules[k].alpha


def test_diffusers_layout_kohya_names_become_ldm_names(tmp_path):
    from safetensors.torch import save_file

    sdxl = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_up_blocks_0_attentions_2_proj_out": "lora_unet_output_blocks_2_1_proj_out",
            "lora_unet_mid_block_attentions_0_transformer_blocks_1_attn2_to_k":
            "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k",
            "lora_unet_down_blocks_0_resnets_1_conv1": "lora_unet_input_blocks_2_0_in_layers_2"}
    koala = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
             "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_up_blocks_1_attentions_1_proj_in": "lora_unet_output_blocks_3_1_proj_in"}
    for i, mapping in enumerate((sdxl, koala)):
        sd = {}
        for src in mapping:
            sd[f"{src}.lora_down.weight"] = torch.randn(2, 4)
            sd[f"{src}.lora_up.weight"] = torch.randn(4, 2)
        p = tmp_path / f"{i}.safetensors"
        save_file(sd, str(p))
        assert set(load_adapter(p).modules) == set(mapping.values())
