import math
import re

import pytest
import torch

from lora2_train.config import LoRA2Config
from lora2_train.models import SDXLUNet, koala_700m_config, sdxl_config
from lora2_train.network import LoRA2Network
from tests_helpers import diffusers_sdxl_like, tiny_clip_text_model

from tests_helpers import unet_inputs

ATTN_KEY = re.compile(
    r"^lora_unet_(input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)$")


def cfg(**kw):
    base = dict(r_init=4, r_target=4, r_max=16)
    base.update(kw)
    return LoRA2Config(**base)


def test_sdxl_attention_targets_are_the_papers_560(tiny_sdxl):
    net = LoRA2Network(cfg(), tiny_sdxl)
    assert len(net.layers) == 560  # 70 transformer blocks × (attn1, attn2) × (q, k, v, out)
    assert all(ATTN_KEY.match(k) for k in net.layers)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in net.layers
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0" in net.layers
    assert "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v" in net.layers


def test_koala_700m_targets(tiny_koala):
    net = LoRA2Network(cfg(), tiny_koala)
    assert len(net.layers) == 21 * 8
    assert not any("middle_block" in k for k in net.layers)
    assert "lora_unet_input_blocks_5_1_transformer_blocks_4_attn2_to_k" in net.layers
    assert "lora_unet_output_blocks_1_1_transformer_blocks_4_attn1_to_q" in net.layers


def test_full_size_sdxl_rank512_parameter_count_matches_paper():
    """Spec §4: rank 512 on the 560 attention projections = 743 M parameters = 2.77 GiB in fp32."""
    with torch.device("meta"):
        unet = SDXLUNet(sdxl_config())
        net = LoRA2Network(cfg(r_init=4, r_max=512), unet)
    total = sum(512 * (l.in_dim + l.out_dim) for l in net.layers.values())
    assert len(net.layers) == 560
    assert round(total / 1e6) == 743
    assert round(total * 4 / 2**30, 2) == 2.77


def test_full_size_koala_700m_is_782m_and_168_components():
    with torch.device("meta"):
        unet = SDXLUNet(koala_700m_config())
        net = LoRA2Network(cfg(), unet)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6) == 783
    assert len(net.layers) == 168


def test_target_groups(tiny_sdxl):
    ff = LoRA2Network(cfg(targets=("ff",)), tiny_sdxl)
    assert len(ff.layers) == 140 and all(re.search(r"_ff_net_(0_proj|2)$", k) for k in ff.layers)
    proj = LoRA2Network(cfg(targets=("proj",)), tiny_sdxl)
    assert len(proj.layers) == 2 * 11  # one proj_in + proj_out per SpatialTransformer (11 of them)
    res = LoRA2Network(cfg(targets=("resnet",)), tiny_sdxl)
    kinds = {l.kind for l in res.layers.values()}
    assert kinds == {"conv"}
    assert "lora_unet_input_blocks_1_0_in_layers_2" in res.layers
    assert "lora_unet_output_blocks_0_0_skip_connection" in res.layers
    with pytest.raises(ValueError, match="targets"):
        LoRA2Network(cfg(targets=("te_attn",)), tiny_sdxl)


def test_apply_restore_and_forward_unchanged_at_init(tiny_sdxl):
    x = unet_inputs(tiny_sdxl)
    ref = tiny_sdxl(*x)
    net = LoRA2Network(cfg(targets="all"), tiny_sdxl).apply_to()
    try:
        assert torch.allclose(tiny_sdxl(*x), ref, atol=1e-5)  # B = 0
        with torch.no_grad():
            for l in net.layers.values():
                l.lora_up.normal_(std=0.1)
        assert not torch.allclose(tiny_sdxl(*x), ref, atol=1e-3)
    finally:
        net.restore()
    assert torch.equal(tiny_sdxl(*x), ref)


def test_diffusers_unet_gets_the_same_kohya_keys_as_ldm():
    diff_unet, ldm_unet = diffusers_sdxl_like(layers_per_block=2, depth=(0, 2, 3))
    for targets in ("attn", "all"):
        a = LoRA2Network(cfg(targets=targets), diff_unet)
        b = LoRA2Network(cfg(targets=targets), ldm_unet)
        assert set(a.layers) == set(b.layers)
        for k in a.layers:
            assert (a.layers[k].in_dim, a.layers[k].out_dim, a.layers[k].kernel) == \
                   (b.layers[k].in_dim, b.layers[k].out_dim, b.layers[k].kernel), k


def test_diffusers_koala_layout_gets_the_same_keys():
    diff_unet, ldm_unet = diffusers_sdxl_like(layers_per_block=1, depth=(0, 2, 5), koala=True)
    a = LoRA2Network(cfg(targets="all"), diff_unet)
    b = LoRA2Network(cfg(targets="all"), ldm_unet)
    assert set(a.layers) == set(b.layers)


def test_text_encoders_get_te1_te2_keys(tiny_sdxl):
    te1, te2 = tiny_clip_text_model(), tiny_clip_text_model()
    net = LoRA2Network(cfg(targets=("attn1", "te_attn", "te_mlp")), tiny_sdxl, [te1, te2])
    te1_keys = [k for k in net.layers if k.startswith("lora_te1_")]
    te2_keys = [k for k in net.layers if k.startswith("lora_te2_")]
    assert len(te1_keys) == len(te2_keys) == 2 * 6
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in net.layers
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in net.layers


def test_param_groups_and_reg_loss(tiny_koala):
    c = cfg(lr=1e-4, nu_lr=5e-2, r_target=8)
    net = LoRA2Network(c, tiny_koala)
    groups = net.param_groups()
    assert groups[0]["lr"] == 1e-4 and groups[1]["lr"] == 5e-2 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == len(net.layers)
    rank_term, weight_term = net.reg_loss()
    # every ν starts at ν_target(r_init=4) = ln10/4; the rank term aims at ν_aim(8) = ln10/7.5 (the middle of
    # rank 8's interval), in log-rank: |ln(ln10/4) − ln(ln10/7.5)| = ln(7.5/4)
    assert float(rank_term.detach()) == pytest.approx(math.log(7.5 / 4), rel=1e-4)
    assert float(weight_term.detach()) > 0
    rank_term.backward()
    assert all(l.rho.grad is not None for l in net.layers.values())


def test_vectorized_lambda_matches_per_layer_and_never_goes_stale(tiny_koala):
    net = LoRA2Network(cfg(r_init=8), tiny_koala).apply_to()
    try:
        with torch.no_grad():
            for i, l in enumerate(net.layers.values()):
                l.set_rank(4 + 4 * (i % 3))
                l.lora_up.normal_(std=0.1)
        x = unet_inputs(tiny_koala)
        cached_out = tiny_koala(*x)  # the root's pre-hook hands every layer its slice of Λ
        assert all(l._lam_cache is not None for l in net.layers.values())
        per_layer = torch.cat([l.lam().detach() for l in net.layers.values()])
        assert torch.allclose(torch.cat([l._lam_cache.detach() for l in net.layers.values()]), per_layer, atol=1e-6)
        net.restore()
        for l in net.layers.values():  # patched without the network's hook: the per-layer Λ path
            l.apply_to()
        assert all(l._lam_cache is None for l in net.layers.values())
        assert torch.allclose(tiny_koala(*x), cached_out, atol=1e-5)
        assert all(l._lam_cache is None for l in net.layers.values())
        layer = next(iter(net.layers.values()))
        net.refresh_lam()
        with torch.no_grad():
            layer.rho.add_(1.0)  # an optimizer step changes ρ in place: the cache must not be used
        fresh = layer.lam()
        inp = torch.randn(2, layer.in_dim)
        expected = layer._base_forward(inp) + layer.scale * (inp @ layer.lora_down.T) @ (layer.lora_up * fresh).T
        assert torch.allclose(layer.base(inp), expected, atol=1e-5)
    finally:
        net.restore()
