"""Parts of the Train LoRA² node that need no ComfyUI: its declared inputs, the image-batch → folder hand-off to
sd-scripts, and the progress history shape."""
import sys

import pytest
import torch

from tests_helpers import pack_module


@pytest.fixture
def train_mod():
    with pack_module("lora2_pack_t"):
        yield sys.modules["lora2_pack_t.nodes.train"]


def test_inputs_cover_the_paper_hyperparameters_and_presets(train_mod):
    from lora2_train.config import TARGET_PRESETS

    spec = train_mod.TrainLoRA2.INPUT_TYPES()
    req, opt = spec["required"], spec["optional"]
    for name in ("model", "clip", "vae", "dataset_path", "instance_prompt", "steps", "learning_rate",
                 "nu_learning_rate", "r_init", "r_max", "r_target", "q", "lambda_r", "lambda_e", "seed", "resolution",
                 "batch_size", "target_modules", "backend", "output_name"):
        assert name in req, name
    assert req["target_modules"][0] == list(TARGET_PRESETS)
    assert req["backend"][0] == ["embedded", "sd-scripts"]
    assert {"images", "captions", "sd_scripts_path", "python_path", "base_checkpoint", "resume_from"} <= set(opt)
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    assert train_mod.TrainLoRA2.RETURN_TYPES == ("MODEL", "CLIP", "LORA2", "LORA2_HISTORY", "IMAGE")
    assert train_mod.TrainLoRA2.RETURN_NAMES[-1] == "samples"
    assert {"num_processes", "sample_prompts", "sample_every_n_steps", "sample_sampler"} <= set(opt)
    from lora2_train.kohya.launch import SAMPLERS
    assert sorted(opt["sample_sampler"][0]) == sorted(SAMPLERS)


def test_sample_files_become_one_image_batch(train_mod, tmp_path):
    """sd-scripts' sample PNGs → IMAGE (B, H, W, 3); other sizes are resized to the first; none → one black
    64×64 placeholder (the embedded backend draws no samples)."""
    from PIL import Image

    empty = train_mod.images_tensor([])
    assert empty.shape == (1, 64, 64, 3) and empty.abs().sum() == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (48, 32), (255, 0, 0)).save(a)
    Image.new("RGB", (24, 16), (0, 0, 255)).save(b)
    batch = train_mod.images_tensor([a, b])
    assert batch.shape == (2, 32, 48, 3) and batch.dtype == torch.float32
    assert batch[0, ..., 0].min() == 1.0 and batch[1, ..., 2].min() == 1.0 and batch[1, ..., 0].max() == 0.0


def test_image_batch_becomes_an_image_folder_with_captions(train_mod, tmp_path):
    from lora2_train.dataset import from_images, load_folder

    imgs = torch.rand(2, 40, 48, 3)
    ex = from_images(imgs, "first | second", 32)
    train_mod._write_image_folder(ex, str(tmp_path))
    back = load_folder(tmp_path, 32, instance_prompt="unused")
    assert [e.caption for e in back] == ["first", "second"]
    for a, b in zip(ex, back):
        assert (a.image - b.image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG round trip


def test_block_means_for_the_live_chart(train_mod):
    ranks = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 4,
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": 12,
             "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": 8}
    assert train_mod._block_means(ranks) == {"down.4": 8.0, "mid": 8.0}


def test_python_defaults_equal_the_widget_defaults(train_mod):
    """A prompt in API format may leave an optional input out: it must then get the widget's default."""
    import inspect

    spec = train_mod.TrainLoRA2.INPUT_TYPES()
    params = inspect.signature(train_mod.TrainLoRA2.train).parameters
    for name, decl in spec["optional"].items():
        if len(decl) > 1 and "default" in decl[1] and params[name].default is not inspect.Parameter.empty:
            assert params[name].default == decl[1]["default"], name
    assert params["gradient_checkpointing"].default is True
