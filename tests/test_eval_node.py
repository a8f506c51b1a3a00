"""Score Images (DINO / CLIP) and DreamBooth Prompt called directly (no ComfyUI needed)."""
import numpy as np
import pytest
import torch
from PIL import Image

import eval_models as E
from lora2_train.evaluate import EvalError, Scorer, embed_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora2_eval")
    clip, dino = E.make_models(root)
    return root, clip, dino


@pytest.fixture
def node(models, tmp_path, monkeypatch):
    from nodes import _pack
    from nodes.evaluate import ScoreImages

    root, _, _ = models
    monkeypatch.setattr(_pack, "eval_roots", lambda: [str(root)])
    monkeypatch.setattr(_pack, "input_path", lambda p: str(tmp_path / p))
    E.write_images(tmp_path / "refs", 3, seed=2)
    (tmp_path / "refs" / "notes.md").write_text("not an image")
    return ScoreImages()


def _batch(n=4, seed=1, size=(72, 60)):
    imgs = [np.asarray(E.make_image(seed * 7 + i, size)) for i in range(n)]
    return torch.from_numpy(np.stack(imgs)).float() / 255.0, imgs


def test_inputs_list_the_model_folders(node):
    from nodes.evaluate import ScoreImages

    req = ScoreImages.INPUT_TYPES()["required"]
    assert req["dino_model"][0] == req["clip_model"][0] == ["clip-tiny", "dino-tiny"]
    assert req["images"] == ("IMAGE",) and ScoreImages.INPUT_TYPES()["optional"] == {"reference_images": ("IMAGE",)}
    assert ScoreImages.RETURN_TYPES == ("FLOAT", "FLOAT", "FLOAT", "STRING")


def test_scores_equal_the_library_on_the_same_pixels(node, models, tmp_path):
    _, clip, dino = models
    batch, arrays = _batch()
    out = node.score(batch, "a sks dog\na red sks dog\na cat\na sks dog in the snow", "dino-tiny", "clip-tiny",
                     references_folder="refs", batch_size=3)
    dino_s, clip_i, clip_t, summary = out["result"]
    lib = Scorer(str(clip), str(dino), device="cpu")
    refs = embed_folder(lib, tmp_path / "refs", "references")
    want = lib.score(lib.embed_images(arrays), refs, ["a sks dog", "a red sks dog", "a cat", "a sks dog in the snow"])
    assert (dino_s, clip_i, clip_t) == pytest.approx((want["dino"], want["clip_i"], want["clip_t"]), abs=1e-5)
    assert summary.startswith(f"DINO {want['dino']:.4f}") and "4 images, 3 references" in summary
    assert out["ui"]["text"] == [summary] and out["ui"]["lora2_scores"][0]["n_references"] == 3

    # reference photos as an IMAGE batch: the same scores; both sources together: 6 references
    ref_arrays = [np.asarray(Image.open(p).convert("RGB").resize((80, 80)))
                  for p in sorted((tmp_path / "refs").glob("*.png"))]
    ref_batch = torch.from_numpy(np.stack(ref_arrays)).float() / 255.0
    only_images = node.score(batch, "a sks dog", "dino-tiny", "clip-tiny", reference_images=ref_batch)["result"]
    want2 = lib.score(lib.embed_images(arrays), lib.embed_images(ref_arrays), ["a sks dog"] * 4)
    assert only_images[:3] == pytest.approx((want2["dino"], want2["clip_i"], want2["clip_t"]), abs=1e-5)
    both = node.score(batch, "a sks dog", "dino-tiny", "clip-tiny", references_folder="refs",
                      reference_images=ref_batch)
    assert both["ui"]["lora2_scores"][0]["n_references"] == 6


def test_bad_inputs_are_clear_errors(node):
    batch, _ = _batch(3)
    with pytest.raises(EvalError, match="prompts: 2 lines for 3 images"):
        node.score(batch, "a\nb", "dino-tiny", "clip-tiny", references_folder="refs")
    with pytest.raises(EvalError, match="prompts: no prompts"):
        node.score(batch, "  \n", "dino-tiny", "clip-tiny", references_folder="refs")
    with pytest.raises(EvalError, match="no references"):
        node.score(batch, "a", "dino-tiny", "clip-tiny")
    with pytest.raises(EvalError, match="missing: no such folder"):
        node.score(batch, "a", "dino-tiny", "clip-tiny", references_folder="missing")
    with pytest.raises(EvalError, match="dino_model: no model folder chosen"):
        node.score(batch, "a", "(none)", "clip-tiny", references_folder="refs")
    with pytest.raises(FileNotFoundError, match="'gone' not found in ComfyUI's models/lora2_eval"):
        node.score(batch, "a", "gone", "clip-tiny", references_folder="refs")
    with pytest.raises(EvalError, match="dino_model .*clip-tiny: a 'clip' model, expected 'vit'"):
        node.score(batch, "a", "clip-tiny", "clip-tiny", references_folder="refs")


def test_dreambooth_prompt_node():
    from nodes.evaluate import DreamBoothPrompt

    prompt, everything = DreamBoothPrompt().prompt("live", 2, "sks", "dog")
    assert prompt == "a sks dog on the beach"
    lines = everything.splitlines()
    assert len(lines) == 25 and lines[2] == prompt and lines[10] == "a sks dog wearing a red hat"
    assert DreamBoothPrompt().prompt("object", 24, "zwx", "teapot")[0] == "a cube shaped zwx teapot"
    with pytest.raises(EvalError, match="non-empty token"):
        DreamBoothPrompt().prompt("object", 0, " ", "teapot")
