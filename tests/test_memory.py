"""The rough training-memory estimate and the fit decision (lora2_train.memory), by hand."""
import pytest
import torch

from lora2_train.memory import GIB, MemoryEstimate, check_fits, estimate, lora_parameters, target_shapes


def test_lora_parameters_by_hand():
    # linear 320→320 at r_max 16: 16·640; conv 3×3 320→640 (in·k = 2880): 16·3520; a 4→8 layer caps at rank 4
    assert lora_parameters([(320, 320), (2880, 640), (4, 8)], 16) == 16 * 640 + 16 * 3520 + 4 * 12
    assert lora_parameters([(320, 320)], 16, max_params=1000) == 1000  # the max_params cap
    assert lora_parameters([], 16) == 0


def test_estimate_by_hand():
    e = estimate(weight_bytes=5 * GIB, lora_params=10_000_000, pixels=1024 * 1024, batch_size=2,
                 gradient_checkpointing=False, optimizer="adamw")
    assert e.weights == 5 * GIB
    assert e.lora == 10_000_000 * (4 + 4 + 8)  # weight, gradient, two Adam moments, all float32
    assert e.activations == 2 * 1024 * 1024 * 16 * 1024 == 32 * GIB  # 16 GiB per 1024² image without checkpointing
    assert e.total == e.weights + e.lora + e.activations
    gc = estimate(0, 0, 1024 * 1024, 1, True)
    assert gc.activations == 2560 * 1024 * 1024 == 2.5 * GIB
    assert estimate(0, 0, 1024 * 1024, 1, True, dtype_bytes=4).activations == 5 * GIB  # a float32 model
    assert estimate(0, 1000, 0, 1, True, optimizer="adamw8bit").lora == 1000 * 10
    assert estimate(0, 1000, 0, 1, True, optimizer="prodigy").lora == 1000 * 24
    with pytest.raises(ValueError, match="optimizer must be one of"):
        estimate(0, 0, 0, 1, True, optimizer="sgd")


def test_fit_decision_with_fake_numbers():
    e = MemoryEstimate(weights=5 * GIB, lora=1 * GIB, activations=10 * GIB)  # 16 GiB in all
    check_fits(e, free_bytes=16 * GIB)  # exactly fits
    check_fits(e, free_bytes=11 * GIB, resident_bytes=5 * GIB)  # the model is already loaded: 11 GiB more needed
    with pytest.raises(MemoryError) as err:
        check_fits(e, free_bytes=12 * GIB, device="cuda:0", gradient_checkpointing=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("this run needs about 16.0 GiB on cuda:0 (model 5.0, LoRA at r_max with gradients and optimizer "
                   "state 1.0, activations 10.0) but only 12.0 GiB are available; lower batch_size, resolution or "
                   "r_max (or set max_params_millions), or turn gradient_checkpointing on")
    with pytest.raises(MemoryError) as err:
        check_fits(e, free_bytes=10 * GIB, resident_bytes=5 * GIB, gradient_checkpointing=True)
    assert "only 15.0 GiB are available" in str(err.value) and "gradient_checkpointing" not in str(err.value)


def test_target_shapes_follow_the_networks_choice():
    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, koala_700m_config, reduced
    from lora2_train.network import LoRA2Network

    unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8))
    for targets in ("attn", "all"):
        cfg = LoRA2Config(targets=targets, r_init=1, r_target=1, r_max=8, rank_block=1)
        shapes = target_shapes(unet, cfg.targets + ("te_attn",))  # text-encoder groups are not in the U-Net
        net = LoRA2Network(cfg, unet)
        assert len(shapes) == len(net.layers)
        # every component grown to r_max has exactly the estimated parameter count
        for layer in net.layers.values():
            layer.resize(layer.r_max)
        assert lora_parameters(shapes, 8) == net.num_parameters()
    assert target_shapes(unet, ("te_attn",)) == []


def test_target_shapes_count_the_text_encoders_the_network_wraps():
    from lora2_train.config import LoRA2Config
    from lora2_train.models import SDXLUNet, koala_700m_config, reduced
    from lora2_train.network import LoRA2Network

    def encoder(width):  # CLIP-like: q/k/v/out projections and an MLP per layer
        te = torch.nn.Module()
        te.add_module("layers", torch.nn.ModuleList())
        for _ in range(2):
            layer = torch.nn.Module()
            layer.add_module("self_attn", torch.nn.Module())
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                layer.self_attn.add_module(p, torch.nn.Linear(width, width))
            layer.add_module("mlp", torch.nn.Module())
            layer.mlp.add_module("fc1", torch.nn.Linear(width, 4 * width))
            layer.mlp.add_module("fc2", torch.nn.Linear(4 * width, width))
            te.layers.append(layer)
        return te

    unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8))
    encoders = [encoder(16), encoder(24)]
    for targets in ("attn1,attn2,te_attn", "attn1,attn2,te_attn,te_mlp"):
        cfg = LoRA2Config(targets=targets, r_init=1, r_target=1, r_max=8, rank_block=1)
        shapes = target_shapes(unet, cfg.targets, encoders)
        net = LoRA2Network(cfg, unet, text_encoders=encoders)
        try:
            assert len(shapes) == len(net.layers) > len(target_shapes(unet, cfg.targets))
            for layer in net.layers.values():
                layer.resize(layer.r_max)
            assert lora_parameters(shapes, 8) == net.num_parameters()
        finally:
            net.restore()
