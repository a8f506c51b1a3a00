"""Parts of the Train LoRA² node that need no ComfyUI: its declared inputs, the image-batch → folder hand-off to
sd-scripts, and the progress history shape."""
import sys

import pytest
import torch

from tests_helpers import pack_module

from lora2_train.dataset import write_image_folder
from lora2_train.kohya.launch import training_options


@pytest.fixture
def train_mod():
    with pack_module("lora2_pack_t"):
        yield sys.modules["lora2_pack_t.nodes.train"]


def test_inputs_cover_the_paper_hyperparameters_and_presets(train_mod):
    from lora2_train.config import TARGET_PRESETS

    spec = train_mod.TrainLoRA2Legacy.INPUT_TYPES()  # every training input, on the one-node version
    req, opt = spec["required"], spec["optional"]
    for name in ("model", "clip", "vae", "dataset_path", "instance_prompt", "steps", "learning_rate",
                 "nu_learning_rate", "r_init", "r_max", "r_target", "q", "lambda_r", "lambda_e", "seed", "resolution",
                 "batch_size", "target_modules", "backend", "output_name"):
        assert name in req, name
    # the U-Net presets keep their names and meaning; two choices add the text encoders' LoRAs
    assert req["target_modules"][0] == list(TARGET_PRESETS) + ["attn+te_attn", "attn+te_attn+te_mlp"]
    assert req["target_modules"][1]["default"] == "attn"
    assert req["backend"][0] == ["embedded", "sd-scripts"]
    assert {"images", "captions", "sd_scripts_path", "python_path", "base_checkpoint", "resume_from"} <= set(opt)
    assert spec["hidden"] == {"unique_id": "UNIQUE_ID"}
    # sd-scripts backend: bf16 mixed precision with AdamW unless chosen otherwise
    assert opt["optimizer"][0][0] == "adamw" == opt["optimizer"][1]["default"]
    assert {"adamw8bit", "adafactor", "prodigy", "lion", "adam"} <= set(opt["optimizer"][0])
    assert opt["mixed_precision"][0] == ["bf16", "fp16", "no"] and opt["mixed_precision"][1]["default"] == "bf16"
    assert opt["fp8_base"][1]["default"] is False and opt["full_bf16"][1]["default"] is False
    assert opt["max_params_millions"][1]["default"] == 0.0
    assert opt["preset"][0] == ["none", "8GB", "12GB", "16GB", "24GB", "48GB"] and opt["preset"][1]["default"] == "none"
    assert train_mod.TrainLoRA2.RETURN_TYPES == ("MODEL", "CLIP", "LORA2", "LORA2_HISTORY", "STRING", "IMAGE")
    # appended: links to the first four keep their slots
    assert train_mod.TrainLoRA2.RETURN_NAMES[4:] == ("info", "samples")
    assert train_mod.TrainLoRA2Legacy.RETURN_TYPES == train_mod.TrainLoRA2.RETURN_TYPES
    # the training controls, buckets and ComfyUI dataset inputs are optional, so older workflows still run
    defaults = {"gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "lr_scheduler": "constant",
                "lr_warmup_steps": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "loss_type": "mse", "huber_c": 0.1,
                "save_every_n_steps": 0, "aspect_buckets": True, "min_bucket_reso": 256, "max_bucket_reso": 2048}
    for name, default in defaults.items():
        assert opt[name][1]["default"] == default, name
    assert opt["lr_scheduler"][0] == ["constant", "constant_with_warmup", "cosine"]
    assert opt["loss_type"][0] == ["mse", "huber"]
    assert opt["latents"][0] == "LATENT" and opt["positive"][0] == "CONDITIONING"
    assert {"num_processes", "sample_prompts", "sample_every_n_steps", "sample_sampler"} <= set(opt)
    from lora2_train.kohya.launch import SAMPLERS
    assert sorted(opt["sample_sampler"][0]) == sorted(SAMPLERS)


def test_sample_files_become_one_image_batch(train_mod, tmp_path):
    """sd-scripts' sample PNGs → IMAGE (B, H, W, 3); other sizes are resized to the first; none → one black
    64×64 placeholder (no samples asked for)."""
    from PIL import Image

    empty = train_mod.samples.images_tensor([])
    assert empty.shape == (1, 64, 64, 3) and empty.abs().sum() == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (48, 32), (255, 0, 0)).save(a)
    Image.new("RGB", (24, 16), (0, 0, 255)).save(b)
    batch = train_mod.samples.images_tensor([a, b])
    assert batch.shape == (2, 32, 48, 3) and batch.dtype == torch.float32
    assert batch[0, ..., 0].min() == 1.0 and batch[1, ..., 2].min() == 1.0 and batch[1, ..., 0].max() == 0.0


def test_image_batch_becomes_an_image_folder_with_captions(train_mod, tmp_path):
    from lora2_train.dataset import from_images, load_folder

    imgs = torch.rand(2, 40, 48, 3)
    ex = from_images(imgs, "first | second", 32)
    write_image_folder(ex, str(tmp_path))
    back = load_folder(tmp_path, 32, instance_prompt="unused")
    assert [e.caption for e in back] == ["first", "second"]
    for a, b in zip(ex, back):
        assert (a.image - b.image).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG round trip


def test_block_means_for_the_live_chart(train_mod):
    ranks = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 4,
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": 12,
             "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_v": 8}
    assert train_mod.progress.block_means(ranks) == {"down.4": 8.0, "mid": 8.0}


def test_unconnected_settings_are_the_widget_defaults_and_those_of_lora2config(train_mod):
    """A settings node left unconnected (or an API prompt without it) gives its widgets' defaults, and those are
    LoRA2Config's wherever it has the field."""
    from lora2_train.config import LoRA2Config

    S = train_mod.settings
    values = S.merged({}, {})
    every = train_mod.node.all_inputs()
    assert set(values) == set(every) - set(S.essential_inputs())
    for name, decl in every.items():
        if name in values:
            assert values[name] == (decl[1].get("default") if len(decl) > 1 else None), name
    d = LoRA2Config()
    fields = {"q": d.q, "r_init": d.r_init, "lambda_r": d.lambda_r, "lambda_e": d.lambda_e, "beta": d.beta,
              "nu_learning_rate": d.nu_lr, "rank_block": d.rank_block, "resize_every": d.resize_every,
              "lr_scheduler": d.lr_scheduler, "max_grad_norm": d.max_grad_norm, "huber_c": d.huber_c,
              "loss_type": d.loss_type, "text_encoder_lr": d.text_encoder_lr}
    assert {k: values[k] for k in fields} == fields
    ess = S.essential_inputs()
    assert (ess["learning_rate"][1]["default"], ess["r_target"][1]["default"], ess["r_max"][1]["default"]) == (
        d.lr, d.r_target, d.r_max)
    # node-only defaults: gradient checkpointing on (SDXL at 1024²), AdamW, bf16 for sd-scripts
    assert (values["gradient_checkpointing"], values["optimizer"], values["mixed_precision"]) == (True, "adamw",
                                                                                                 "bf16")
    # a settings value of the wrong kind is refused in one line
    rank = train_mod.RankSettings().settings(**train_mod.RankSettings.defaults())[0]
    with pytest.raises(ValueError, match="input 'training_settings' takes a LORA2_TRAINING_SETTINGS value"):
        S.merged({}, {"training_settings": rank})
    assert S.merged({}, {"rank_settings": dict(rank, beta=7.0)})["beta"] == 7.0


def test_main_node_shows_the_essentials_each_with_a_tooltip(train_mod):
    spec = train_mod.TrainLoRA2.INPUT_TYPES()
    widgets = [k for k, v in spec["required"].items() if k not in ("model", "clip", "vae")]
    assert len(widgets) <= 15
    assert {"dataset_path", "steps", "learning_rate", "r_target", "r_max", "seed", "output_name",
            "backend"} <= set(widgets)
    assert all(spec["required"][k][1].get("tooltip") for k in widgets)
    assert {k: v[0] for k, v in spec["optional"].items()} == {
        "rank_settings": "LORA2_RANK_SETTINGS", "training_settings": "LORA2_TRAINING_SETTINGS",
        "dataset": "LORA2_DATASET", "samples": "LORA2_SAMPLES", "sd_scripts": "LORA2_SD_SCRIPTS"}
    for node in train_mod.settings.SETTINGS.values():  # every settings widget explains itself too
        decl = node.INPUT_TYPES()
        for group in decl.values():
            for name, d in group.items():
                assert len(d) > 1 and d[1].get("tooltip"), (node.__name__, name)
        assert node.RETURN_TYPES == (node.KIND,)
    # every input of the one-node version is on the main node or exactly one settings node
    homes = [set(train_mod.settings.essential_inputs())] + [set(n.defaults()) for n in
                                                             train_mod.settings.SETTINGS.values()]
    legacy = train_mod.TrainLoRA2Legacy.INPUT_TYPES()
    for name in [*legacy["required"], *legacy["optional"]]:
        if name not in ("model", "clip", "vae"):
            assert sum(name in h for h in homes) == 1, name


def test_legacy_node_keeps_the_widget_order_of_saved_workflows(train_mod):
    spec = train_mod.TrainLoRA2Legacy.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "clip", "vae", "dataset_path", "instance_prompt", "steps",
                                      "learning_rate", "nu_learning_rate", "r_init", "r_max", "r_target", "q",
                                      "lambda_r", "lambda_e", "seed", "resolution", "batch_size", "target_modules",
                                      "backend", "output_name"]
    assert list(spec["optional"])[:6] == ["images", "captions", "sd_scripts_path", "python_path",
                                          "base_checkpoint", "resume_from"]
    assert list(spec["optional"])[-3:] == ["latents", "positive", "beta"]
    assert train_mod.TrainLoRA2Legacy.DEPRECATED is True and train_mod.TrainLoRA2Legacy.INPUT_IS_LIST is True


def test_taken_output_names_get_a_counter(train_mod, tmp_path):
    tools = sys.modules["lora2_pack_t.nodes.tools"]
    assert tools.free_path(str(tmp_path), "run").name == "run.safetensors"
    (tmp_path / "run.safetensors").write_bytes(b"x")
    (tmp_path / "run_2.safetensors").write_bytes(b"x")
    assert tools.free_path(str(tmp_path), "run.safetensors").name == "run_3.safetensors"
    assert tools.free_path(str(tmp_path), "run_step10").name == "run_step10.safetensors"


def test_info_line_names_the_file_and_why(train_mod, tmp_path):
    from lora2_train.format import Adapter, LoRAModule

    ad = Adapter({"lora_unet_a": LoRAModule(torch.zeros(4, 8), torch.zeros(6, 4), 4.0)}, {})

    class Run:
        snapshots = ["lora2_sdxl_2_step5.safetensors"]
        cache_report = ""

        def memory(self):
            return {"peak_memory_mb": 1234.5}

    out = tmp_path / "lora2_sdxl_2.safetensors"
    line = train_mod.progress.info_line(out, "lora2_sdxl", ad, [{"step": 10, "loss": 0.125}], Run())
    assert line == ("saved lora2_sdxl_2.safetensors (lora2_sdxl.safetensors was taken): 1 modules, 56 parameters, "
                    "10 steps, last loss 0.125; snapshots lora2_sdxl_2_step5.safetensors; peak GPU memory 1234 MiB")
    assert "\n" not in line


class _FakeBase:
    """process_latent_in ×2; encode_adm returns its size arguments after the pooled vector."""

    def process_latent_in(self, x):
        return x * 2

    def encode_adm(self, pooled_output, width, height, crop_w, crop_h, target_width, target_height, device=None):
        sizes = torch.tensor([[height, width, crop_h, crop_w, target_height, target_width]], dtype=torch.float32)
        return torch.cat([pooled_output.float(), sizes], 1)


def test_latents_and_conditioning_of_comfyui_dataset_nodes(train_mod):
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 5, 8, generator=g), {"pooled_output": torch.randn(1, 3, generator=g)}]
            for _ in range(3)]
    # MakeTrainingDataset: one LATENT (batch 1) and one CONDITIONING per image, sizes may differ
    lats = [{"samples": torch.randn(1, 4, 8, 8, generator=g)}, {"samples": torch.randn(1, 4, 8, 12, generator=g)},
            {"samples": torch.randn(1, 4, 8, 8, generator=g)}]
    data = train_mod.data.data_from_latents(_FakeBase(), lats, [[c] for c in cond])
    assert len(data) == 3 and data[1]["latents"].shape == (4, 8, 12)
    assert torch.equal(data[1]["latents"], lats[1]["samples"][0] * 2)
    assert torch.equal(data[2]["cond"]["context"], cond[2][0][0])
    assert data[1]["cond"]["y"].tolist()[3:] == [64.0, 96.0, 0.0, 0.0, 64.0, 96.0]  # sizes of the latent × 8
    # ResolutionBucket: one LATENT batch per bucket with a flat list of one entry per sample
    bucket = [{"samples": torch.randn(2, 4, 8, 8, generator=g)}]
    data = train_mod.data.data_from_latents(_FakeBase(), bucket, [[cond[0], cond[1]]])
    assert [torch.equal(d["cond"]["context"], c[0][0]) for d, c in zip(data, cond[:2])] == [True, True]
    # a plain LATENT batch with one CONDITIONING for all (CLIPTextEncodeSDXL sizes are used)
    sdxl = [[torch.randn(1, 5, 8), {"pooled_output": torch.randn(1, 3), "width": 1024, "height": 768}]]
    data = train_mod.data.data_from_latents(_FakeBase(), {"samples": torch.randn(3, 4, 8, 8)}, sdxl)
    assert len(data) == 3 and data[0]["cond"]["y"].tolist()[3:5] == [768.0, 1024.0]
    for bad, match in [((lats, None), "positive: latents need"), ((lats, [[c] for c in cond[:2]]),
                                                                  "2 conditionings for 3"),
                       (([{"x": 1}], cond), "LATENT"), ((bucket, [cond[:3]]), "3 entries for 2"),
                       ((lats[:1], [[[torch.zeros(1, 5, 8), {}]]]), "pooled_output")]:
        with pytest.raises(ValueError, match=match):
            train_mod.data.data_from_latents(_FakeBase(), *bad)


def test_run_unwraps_comfyui_lists(train_mod):
    (d,) = train_mod.DatasetSettings().run(images=[None], captions=["a"], latents=[{"samples": 1}, {"samples": 2}],
                                           positive=[None], aspect_buckets=[True])
    assert d == {"settings": "LORA2_DATASET", "images": None, "captions": "a",
                 "latents": [{"samples": 1}, {"samples": 2}], "positive": None, "aspect_buckets": True}
    with pytest.raises(ValueError, match="'aspect_buckets' got a list of 2"):
        train_mod.DatasetSettings().run(aspect_buckets=[True, False])
    seen = {}
    old = train_mod.request.train
    train_mod.request.train = lambda model, clip, vae, inputs, unique_id: seen.update(inputs, unique_id=unique_id)
    try:
        train_mod.TrainLoRA2Legacy().run(steps=[5], output_name=["x"], images=[None], captions=["a"],
                                         latents=[{"samples": 1}], positive=[None], unique_id=["7"])
    finally:
        train_mod.request.train = old
    assert (seen["steps"], seen["output_name"], seen["images"], seen["captions"], seen["latents"],
            seen["positive"], seen["unique_id"]) == (5, "x", None, "a", [{"samples": 1}], None, "7")
    assert seen["beta"] == train_mod.RankSettings.defaults()["beta"]  # not given: the default
    with pytest.raises(ValueError, match="'steps' got a list of 2"):
        train_mod.TrainLoRA2Legacy().run(steps=[5, 6])


def test_training_controls_reach_sd_scripts_under_its_names(train_mod):
    from lora2_train.config import LoRA2Config

    assert training_options(LoRA2Config()) == {
        "gradient_accumulation_steps": 1, "max_grad_norm": 1.0, "lr_scheduler": "constant", "lr_warmup_steps": None,
        "min_snr_gamma": None, "noise_offset": None, "loss_type": "l2"}
    opts = training_options(LoRA2Config(gradient_accumulation_steps=4, max_grad_norm=0.0, lr_scheduler="cosine",
                                        lr_warmup_steps=10, min_snr_gamma=5.0, noise_offset=0.05, loss_type="huber",
                                        huber_c=0.2))
    assert opts == {"gradient_accumulation_steps": 4, "max_grad_norm": 0.0, "lr_scheduler": "cosine",
                    "lr_warmup_steps": 10, "min_snr_gamma": 5.0, "noise_offset": 0.05, "loss_type": "huber",
                    "huber_c": 0.2, "huber_schedule": "constant"}


def test_image_lists_of_comfyui_dataset_nodes_become_bucketed_examples(train_mod):
    """LoadImageTextDataSetFromFolder gives a list of (1, H, W, 3) images of any size and a list of texts."""
    from lora2_train.dataset import DatasetError, bucket_sizes

    images = [torch.rand(1, 40, 100, 3), torch.rand(1, 30, 30, 3)]
    buckets = bucket_sizes(128, 64, 256)
    ex = train_mod.data.examples("", images, ["wide one", "square one"], "sks", 128, buckets)
    assert [(e.caption, e.target_size, e.original_size, e.source) for e in ex] == [
        ("wide one", (64, 192), (40, 100), "images[0]"), ("square one", (128, 128), (30, 30), "images[1]")]
    assert {e.caption for e in train_mod.data.examples("", images, ["same"], "sks", 128, buckets)} == {"same"}
    with pytest.raises(DatasetError, match="3 captions for 2 images"):
        train_mod.data.examples("", images, ["a", "b", "c"], "sks", 128, buckets)


def test_other_models_are_unloaded_through_model_management(train_mod, monkeypatch):
    import types

    calls = []
    mm = types.SimpleNamespace(unload_all_models=lambda: calls.append("unload"),
                               soft_empty_cache=lambda: calls.append("empty"))
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    train_mod.memory.free_memory()
    assert calls == ["unload", "empty"]
    del mm.soft_empty_cache  # an older ComfyUI without it: the rest still runs
    train_mod.memory.free_memory()
    assert calls == ["unload", "empty", "unload"]


def test_memory_check_refuses_a_cuda_run_that_cannot_fit_and_skips_the_cpu(train_mod):
    """Fake free memory: the decision of the node (the estimate itself is tested in test_memory.py)."""
    from lora2_train.config import LoRA2Config
    from lora2_train.memory import GIB

    class Base:
        diffusion_model = torch.nn.Sequential()
        diffusion_model.add_module("attn1", torch.nn.Module())
        diffusion_model.attn1.add_module("to_q", torch.nn.Linear(64, 64, bias=False))  # 16 KiB of weights

        def get_dtype(self):
            return torch.float16

    def no_query(device):
        raise AssertionError("the CPU is not checked")

    cfg = LoRA2Config(r_init=8, r_target=8, r_max=32, batch_size=2, gradient_checkpointing=False)
    assert train_mod.memory.check_memory(Base(), cfg, 1024 * 1024, "cpu", mem_get_info=no_query) is None
    asked = []
    est = train_mod.memory.check_memory(Base(), cfg, 1024 * 1024, "cuda:0",
                                  mem_get_info=lambda d: (asked.append(str(d)), (40 * GIB, 80 * GIB))[1])
    assert asked == ["cuda:0"]
    # 2 × 1024² pixels × 16 KiB (fp16, no checkpointing) = 32 GiB of activations; 32·128 LoRA parameters × 16 B
    assert est.activations == 32 * GIB and est.lora == 32 * 128 * 16 and est.weights == 64 * 64 * 4
    with pytest.raises(MemoryError, match=r"^Train LoRA² \(SDXL\): this run needs about 32\.0 GiB on cuda:0 .* "
                                          r"only 30\.0 GiB are available; lower batch_size, resolution or r_max .*"
                                          r"gradient_checkpointing on$"):
        train_mod.memory.check_memory(Base(), cfg, 1024 * 1024, "cuda:0", mem_get_info=lambda d: (30 * GIB, 80 * GIB))
    cfg.gradient_checkpointing = True  # 2 × 2.5 GiB: fits
    assert train_mod.memory.check_memory(Base(), cfg, 1024 * 1024, "cuda", mem_get_info=lambda d: (30 * GIB, 80 * GIB))
    # text-encoder targets: the encoders' weights and their targeted Linear layers count too
    te = torch.nn.Module()
    te.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    te.layers[0].add_module("self_attn", torch.nn.Module())
    te.layers[0].self_attn.add_module("q_proj", torch.nn.Linear(32, 64, bias=False))
    te.layers[0].add_module("mlp", torch.nn.Module())
    te.layers[0].mlp.add_module("fc1", torch.nn.Linear(32, 64, bias=False))  # not a te_attn target
    te_cfg = LoRA2Config(r_init=8, r_target=8, r_max=32, batch_size=2, targets="attn1,te_attn",
                         gradient_checkpointing=True)
    est = train_mod.memory.check_memory(Base(), te_cfg, 1024 * 1024, "cuda", mem_get_info=lambda d: (30 * GIB, 80 * GIB),
                                  text_encoders=[te])
    assert est.lora == (32 * 128 + 32 * 96) * 16 and est.weights == (64 * 64 + 2 * 32 * 64) * 4


def test_text_encoder_targets_and_their_learning_rate(train_mod):
    """target_modules choices → LoRA2Config targets; text_encoder_lr sits with the learning-rate inputs, 0 by
    default (= learning_rate)."""
    from lora2_train.config import TARGET_PRESETS, ConfigError, LoRA2Config

    for name, groups in TARGET_PRESETS.items():  # unchanged meaning
        assert LoRA2Config(targets=train_mod.choices.targets(name)).targets == groups
    assert LoRA2Config(targets=train_mod.choices.targets("attn+te_attn")).targets == ("attn1", "attn2", "te_attn")
    assert LoRA2Config(targets=train_mod.choices.targets("attn+te_attn+te_mlp")).targets == (
        "attn1", "attn2", "te_attn", "te_mlp")
    opt = train_mod.TrainingSettings.INPUT_TYPES()["required"]
    names = list(opt)
    assert names[names.index("lr_warmup_steps") + 3] == "text_encoder_lr"
    assert opt["text_encoder_lr"][0] == "FLOAT" and opt["text_encoder_lr"][1]["default"] == 0.0
    assert opt["text_encoder_lr"][1]["min"] == 0.0 and "learning_rate" in opt["text_encoder_lr"][1]["tooltip"]
    with pytest.raises(ConfigError, match="LoRA2Config.text_encoder_lr must be >= 0"):
        LoRA2Config(text_encoder_lr=-1.0)
    assert not train_mod.text.trains_text_encoders(LoRA2Config(targets="all"))
    assert train_mod.text.trains_text_encoders(LoRA2Config(targets=train_mod.choices.targets("attn+te_attn")))


def test_text_encoder_training_needs_sdxl_s_two_clip_models(train_mod):
    import types

    with pytest.raises(ValueError, match="^clip: text-encoder targets need the CLIP input connected$"):
        train_mod.text.text_encoders(None)
    refiner = types.SimpleNamespace(cond_stage_model=type("SDXLRefinerClipModel", (), {"clip_g": object()})())
    with pytest.raises(ValueError, match="clip_l, clip_g.*SDXLRefinerClipModel"):
        train_mod.text.text_encoders(refiner)
    both = types.SimpleNamespace(cond_stage_model=types.SimpleNamespace(clip_l="L", clip_g="G"))
    assert train_mod.text.text_encoders(both) == ("L", "G")


def test_text_encoder_lr_reaches_sd_scripts(train_mod, monkeypatch, tmp_path):
    """The node's inputs → the config handed to the sd-scripts backend → sd-scripts' settings: the text encoders
    trained (no cached text-encoder outputs) at text_encoder_lr, 0 meaning learning_rate."""
    import types

    from lora2_train.kohya import launch

    monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(get_folder_paths=lambda k: [str(tmp_path)],
                                                                           get_filename_list=lambda k: []))
    monkeypatch.setattr(train_mod.progress, "Run", lambda node_id, total: None)
    seen = []

    class Handed(Exception):
        pass

    def backend(config, *args, **kwargs):
        seen.append(config)
        raise Handed

    monkeypatch.setattr(train_mod.sd_scripts, "train_sd_scripts", backend)
    node = train_mod.TrainLoRA2()
    (rank,) = train_mod.RankSettings().settings(nu_learning_rate=1e-2, r_init=8, q=0.9, lambda_r=1.0)
    inputs = dict(model=None, clip=None, vae=None, dataset_path=str(tmp_path), instance_prompt="sks", steps=10,
                  learning_rate=2e-4, r_max=32, r_target=8, seed=0, resolution=512, batch_size=1,
                  backend="sd-scripts", output_name="x", rank_settings=rank)
    for targets, groups, te_lr, expected in (("attn+te_attn", "attn1,attn2,te_attn", 5e-5, 5e-5),
                                             ("attn+te_attn+te_mlp", "attn1,attn2,te_attn,te_mlp", 0.0, 2e-4),
                                             ("attn", "attn1,attn2", 5e-5, None)):
        with pytest.raises(Handed):
            (training,) = train_mod.TrainingSettings().settings(text_encoder_lr=te_lr)
            node.train(**inputs, target_modules=targets, training_settings=training)
        config = seen[-1]
        assert config.text_encoder_lr == te_lr
        s = launch.training_settings(tmp_path / "sdxl.safetensors", tmp_path / "d.toml", tmp_path, "x", config,
                                     steps=10, seed=0)
        args = dict(a.split("=", 1) for a in s["network_args"])
        assert args["targets"] == groups
        assert s.get("text_encoder_lr") == expected and s["learning_rate"] == s["unet_lr"] == 2e-4
        assert s["network_train_unet_only"] is (expected is None)
        assert s["cache_text_encoder_outputs"] is (expected is None)


def test_sample_tensors_become_one_image_batch(train_mod):
    """The embedded backend's samples ((H, W, 3) tensors) → one IMAGE batch, other sizes resized to the first."""
    a, b = torch.full((32, 48, 3), 0.25), torch.full((16, 24, 3), 0.75)
    batch = train_mod.samples.images_tensor([a, b, a])
    assert batch.shape == (3, 32, 48, 3)
    assert torch.equal(batch[0], a) and torch.equal(batch[2], a)
    assert torch.allclose(batch[1], torch.full((32, 48, 3), 0.75), atol=1e-5)


def test_sampling_keeps_the_training_model_loaded(train_mod, monkeypatch):
    """While sampling during training, ComfyUI's free_memory (called to make room for the VAE) keeps the model
    being trained; outside, free_memory is ComfyUI's own again."""
    import types

    calls = []

    def free_memory(memory_required, device, keep_loaded=[]):
        calls.append(list(keep_loaded))

    training, other = object(), object()
    entries = [types.SimpleNamespace(model=other), types.SimpleNamespace(model=training)]
    mm = types.SimpleNamespace(free_memory=free_memory, current_loaded_models=entries)
    monkeypatch.setitem(sys.modules, "comfy", types.SimpleNamespace(model_management=mm))
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    with train_mod.memory.keep_loaded(training):
        mm.free_memory(1, "cuda", ["vae"])
        mm.free_memory(1, "cuda")
    assert mm.free_memory is free_memory
    assert calls == [["vae", entries[1]], [entries[1]]]


def test_vae_encoding_follows_the_seed_and_leaves_the_global_generator(train_mod):
    """ComfyUI's VAE encode samples the latent distribution with the global generator: the node encodes under
    a state seeded with the run's seed, so the same images and seed give the same latents, another seed other
    latents, and the caller's random stream goes on as if nothing was drawn."""
    from types import SimpleNamespace

    class VAE:  # draws from the global generator like ComfyUI's DiagonalGaussian sampling
        def encode(self, pixels):
            return torch.randn(1, 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    class Base:
        process_latent_in = staticmethod(lambda x: x)

    ex = SimpleNamespace(image=torch.rand(3, 64, 64), caption="a", original_size=(64, 64), crop_top_left=(0, 0),
                         target_size=(64, 64))
    encode = lambda seed: [d["latents"] for d in train_mod.encode.encode_examples(Base(), None, VAE(), [ex, ex],
                                                                                    captions_only=True, seed=seed)]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = encode(7)
    assert torch.equal(torch.rand(3), expected_next)  # the global stream is untouched
    b, c = encode(7), encode(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two draws within one run differ, as ComfyUI's sampling does


class _FakeVAE:
    """ComfyUI-like VAE: a latent from the pixels plus a draw from the global generator; counts its calls."""

    def __init__(self, scale=1.0):
        self.scale, self.calls = scale, 0

    def encode(self, pixels):
        self.calls += 1
        x = pixels.permute(0, 3, 1, 2)
        mean = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4] * self.scale
        return mean + 0.1 * torch.randn(mean.shape)


class _FakeCLIP:
    """ComfyUI-like CLIP: tokenize → {"g": [[(id, weight), …]]}; encode_from_tokens → (cond, pooled)."""

    def __init__(self, shift=0.0, token_extra=None):
        self.shift, self.token_extra, self.calls = shift, token_extra, 0

    def tokenize(self, text):
        tokens = [(ord(c), 1.0) for c in text[:16]]
        if self.token_extra is not None:
            tokens.append(self.token_extra)
        return {"g": [tokens]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls += 1
        ids = torch.tensor([float(t[0]) if isinstance(t[0], int) else 0.0 for t in tokens["g"][0]], dtype=torch.float32)
        cond = (ids[:, None] / 100 + torch.arange(8) + self.shift)[None]
        return cond, cond.mean(1)


def _examples(n=3, seed=0):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    return [SimpleNamespace(image=torch.rand(3, 32, 24 + 8 * i, generator=g), caption=f"caption {i % 2}",
                            original_size=(40, 30 + 8 * i), crop_top_left=(4, 0), target_size=(32, 24 + 8 * i))
            for i in range(n)]


def _same_data(a, b):
    return len(a) == len(b) and all(torch.equal(x["latents"], y["latents"]) and x["cond"].keys() == y["cond"].keys()
                                    and all(torch.equal(x["cond"][k], y["cond"][k]) for k in x["cond"])
                                    for x, y in zip(a, b))


def test_second_encoding_of_the_same_data_comes_from_the_disk_cache(train_mod, tmp_path):
    """cache_to_disk: the second run on the same images, captions, encoders and seed gives bit-identical training
    data without encoding an image or caption (the encoders only see their fixed probe input); a changed image,
    another seed, another VAE or CLIP (a LoRA patched in: other outputs) are encoded anew."""
    from lora2_train.cache import EncodeCache

    base, exs = _FakeBase(), _examples()

    def encode(vae, clip, examples=exs, seed=3, root=tmp_path / "cache"):
        cache = EncodeCache(root)
        data = train_mod.encode.encode_examples(base, clip, vae, examples, seed=seed, cache=cache)
        return data, cache

    vae, clip = _FakeVAE(), _FakeCLIP()
    first, c1 = encode(vae, clip)
    assert (vae.calls, clip.calls) == (1 + 3, 1 + 2)  # probe + 3 images; probe + 2 distinct captions
    assert c1.report() == "latents 0 from cache, 3 encoded; text 0 from cache, 2 encoded"
    vae2, clip2 = _FakeVAE(), _FakeCLIP()
    second, c2 = encode(vae2, clip2)
    assert (vae2.calls, clip2.calls) == (1, 1)  # the probes only
    assert c2.report() == "latents 3 from cache, 0 encoded; text 2 from cache, 0 encoded"
    assert _same_data(first, second)
    # the same as encoding without any cache
    assert _same_data(first, train_mod.encode.encode_examples(base, _FakeCLIP(), _FakeVAE(), exs, seed=3))

    changed = _examples()
    changed[1].image[0, 5, 5] += 1 / 255
    _, c = encode(_FakeVAE(), _FakeCLIP(), examples=changed)
    assert (c.hits["latents"], c.misses["latents"]) == (2, 1)
    _, c = encode(_FakeVAE(), _FakeCLIP(), seed=4)
    assert (c.hits.get("latents", 0), c.hits["text"]) == (0, 2)  # captions do not depend on the seed
    _, c = encode(_FakeVAE(scale=1.001), _FakeCLIP(shift=0.5))
    assert c.report() == "latents 0 from cache, 3 encoded; text 0 from cache, 2 encoded"


def test_cache_keeps_two_copies_of_an_image_as_two_draws_and_skips_tokens_it_cannot_key(train_mod, tmp_path):
    from lora2_train.cache import EncodeCache

    ex = _examples(1)[0]
    data = train_mod.encode.encode_examples(_FakeBase(), _FakeCLIP(), _FakeVAE(), [ex, ex], seed=1,
                                            cache=EncodeCache(tmp_path))
    assert not torch.equal(data[0]["latents"], data[1]["latents"])
    again = train_mod.encode.encode_examples(_FakeBase(), _FakeCLIP(), _FakeVAE(), [ex, ex], seed=1,
                                             cache=EncodeCache(tmp_path))
    assert _same_data(data, again)
    # a token the key cannot hold (an object of some newer ComfyUI): encoded every time, never stored
    odd = _FakeCLIP(token_extra=(object(), 1.0))
    odd_data = train_mod.encode.encode_examples(_FakeBase(), odd, _FakeVAE(), [ex], seed=1,
                                                cache=EncodeCache(tmp_path))
    assert odd.calls == 2 and odd_data[0]["cond"]["context"].shape == (len("caption 0") + 1, 8)


def test_cache_to_disk_is_an_input_and_its_report_ends_the_info_line(train_mod, tmp_path):
    from types import SimpleNamespace

    spec = train_mod.DatasetSettings.INPUT_TYPES()["required"]["cache_to_disk"]
    assert spec[0] == "BOOLEAN" and spec[1]["default"] is True
    run = SimpleNamespace(snapshots=[], memory=dict, cache_report="latents 2 from cache, 0 encoded")
    ad = SimpleNamespace(modules={"a": 1}, num_parameters=lambda: 10)
    line = train_mod.progress.info_line(tmp_path / "x.safetensors", "x", ad, [], run)
    assert line == "saved x.safetensors: 1 modules, 10 parameters; latents 2 from cache, 0 encoded"


def test_samples_of_a_text_encoder_run_encode_their_prompts_through_the_trained_encoders(train_mod):
    """Text-encoder targets: each sampling encodes the prompts anew through the encoders as trained so far (the
    samples then show the text-encoder LoRA too); otherwise the conditioning encoded before training is used."""
    from lora2_train.sample_prompts import parse_prompts

    prompts = parse_prompts("a toy --n blurry\na cube --n blurry", width=64, height=64, steps=2, cfg=5.0, seed=0,
                            sampler="euler")

    class Text:  # _TextConditioning.encode_text: its output follows the encoders' LoRA (here: a counter)
        calls = []

        def encode_text(self, text):
            self.calls.append(text)
            v = float(len(self.calls))
            return torch.full((1, 3, 4), v), torch.full((1, 2), v)

    text = Text()
    sampler = train_mod.samples.Sampler(None, None, prompts, None, None, "x", text=text)
    first, second = sampler._conds(), sampler._conds()
    assert text.calls == ["a toy", "blurry", "a cube"] * 2  # every distinct text once per sampling
    pos0, neg0 = first[0]
    assert pos0[0][0].flatten()[0] == 1.0 and neg0[0][0].flatten()[0] == 2.0
    assert second[0][0][0][0].flatten()[0] == 4.0  # encoded anew, not the first sampling's conditioning
    assert pos0[0][1]["width"] == 64 and torch.equal(pos0[0][1]["pooled_output"], torch.full((1, 2), 1.0))
    plain = train_mod.samples.Sampler(None, None, prompts, "precomputed", None, "x")
    assert plain._conds() == "precomputed"
