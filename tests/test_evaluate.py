"""DINO / CLIP-I / CLIP-T (lora2_train.evaluate) against computations written out here, prompt rules, errors, CLI.

The models are tiny random-weight ViT and CLIP folders saved with save_pretrained (tests/eval_models.py); the
reference computations use torchvision transforms and the models' sub-modules directly, not the library.
"""
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

import eval_models as E
from lora2_train import cli
from lora2_train.evaluate import (EvalError, Scorer, dreambooth_prompts, dreambooth_templates, list_images,
                                  match_prompts, read_prompt_lines)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return E.make_models(tmp_path_factory.mktemp("eval_models"))


@pytest.fixture(scope="module")
def scorer(models):
    clip, dino = models
    return Scorer(str(clip), str(dino), device="cpu", batch_size=3)


@pytest.fixture
def folders(tmp_path):
    gen = E.write_images(tmp_path / "gen", 5, seed=1)
    ref = E.write_images(tmp_path / "ref", 3, seed=2, sizes=[(120, 90), (70, 130), (224, 224)], suffix=".jpg")
    return tmp_path / "gen", tmp_path / "ref", gen, ref


# ---------------------------------------------------------------------------------- independent reference


def _independent_scores(clip_dir, dino_dir, gen, ref, prompts):
    """The three metrics written out with torchvision preprocessing and the models' own sub-modules."""
    from PIL import Image
    from torchvision import transforms as T
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    def rgb(p):
        with Image.open(p) as im:
            return im.convert("RGB")

    dino_tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    cfg = json.loads((Path(clip_dir) / "preprocessor_config.json").read_text())
    clip_tf = T.Compose([T.Resize(cfg["size"]["shortest_edge"], interpolation=T.InterpolationMode.BICUBIC),
                         T.CenterCrop((cfg["crop_size"]["height"], cfg["crop_size"]["width"])), T.ToTensor(),
                         T.Normalize(cfg["image_mean"], cfg["image_std"])])
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        def dino_emb(paths):
            return [vit(pixel_values=dino_tf(rgb(p))[None]).last_hidden_state[0, 0] for p in paths]

        def clip_emb(paths):
            return [clip.visual_projection(clip.vision_model(pixel_values=clip_tf(rgb(p))[None]).pooler_output)[0]
                    for p in paths]

        def text_emb(text):
            ids = tok(text, return_tensors="pt")["input_ids"]
            return clip.text_projection(clip.text_model(input_ids=ids).pooler_output)[0]

        cos = torch.nn.functional.cosine_similarity
        dg, dr, cg, cr = dino_emb(gen), dino_emb(ref), clip_emb(gen), clip_emb(ref)
        dino = [float(cos(a, b, dim=0)) for a in dg for b in dr]
        clip_i = [float(cos(a, b, dim=0)) for a in cg for b in cr]
        clip_t = [float(cos(a, text_emb(t), dim=0)) for a, t in zip(cg, prompts)]
    return {"dino": sum(dino) / len(dino), "clip_i": sum(clip_i) / len(clip_i), "clip_t": sum(clip_t) / len(clip_t),
            "dino_pairs": dino, "clip_t_each": clip_t}


def test_metrics_match_an_independent_computation(models, scorer, folders):
    from lora2_train.evaluate import embed_folder, evaluate_folder

    clip_dir, dino_dir = models
    gen_dir, ref_dir, gen, ref = folders
    prompts = ["a sks dog", "a sks dog on the beach", "a red sks dog", "a cat", "a sks dog in the snow"]
    refs = embed_folder(scorer, ref_dir, "references")
    got = evaluate_folder(scorer, gen_dir, refs, prompts=prompts)
    want = _independent_scores(clip_dir, dino_dir, gen, ref, prompts)
    assert got["n_images"] == 5 and got["n_references"] == 3
    for key in ("dino", "clip_i", "clip_t"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert [r["clip_t"] for r in got["per_image"]] == pytest.approx(want["clip_t_each"], abs=1e-5)
    per_image_dino = [sum(want["dino_pairs"][3 * i:3 * i + 3]) / 3 for i in range(5)]
    assert [r["dino"] for r in got["per_image"]] == pytest.approx(per_image_dino, abs=1e-5)
    assert [Path(r["image"]).name for r in got["per_image"]] == [p.name for p in gen]
    assert [r["prompt"] for r in got["per_image"]] == prompts
    # the scores are not degenerate: images and prompts are told apart
    assert len({round(r["dino"], 4) for r in got["per_image"]}) == 5
    assert len({round(r["clip_t"], 4) for r in got["per_image"]}) == 5
    # identical folders: DINO and CLIP-I of an image with itself are 1
    self_refs = embed_folder(scorer, gen_dir, "references")
    same = scorer.score(self_refs, self_refs, prompts)
    assert torch.allclose((self_refs.dino @ self_refs.dino.T).diagonal(), torch.ones(5), atol=1e-5)
    assert same["dino"] < 1.0


def test_batch_size_and_image_inputs_do_not_change_scores(models, scorer, folders):
    from PIL import Image

    from lora2_train.evaluate import comfy_to_pil

    clip_dir, dino_dir = models
    gen_dir, ref_dir, gen, ref = folders
    one = Scorer(str(clip_dir), str(dino_dir), device="cpu", batch_size=1)
    a, b = scorer.embed_images(gen), one.embed_images(gen)
    assert torch.allclose(a.dino, b.dino, atol=1e-5) and torch.allclose(a.clip, b.clip, atol=1e-5)
    # a ComfyUI IMAGE batch scores as the PNGs ComfyUI's SaveImage writes from it
    import numpy as np
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((64, 48))) for p in gen[:3]]
    batch = torch.from_numpy(np.stack(imgs)).float() / 255.0
    from_batch = scorer.embed_images(comfy_to_pil(batch))
    from_arrays = scorer.embed_images(imgs)
    assert torch.allclose(from_batch.dino, from_arrays.dino, atol=1e-6)


# -------------------------------------------------------------------------------------------- prompts


def test_prompt_rules(tmp_path):
    imgs = E.write_images(tmp_path, 3, seed=3)
    assert match_prompts(imgs, prompt=" a dog ") == ["a dog"] * 3
    assert match_prompts(imgs, prompts=["x", "y", "z"]) == ["x", "y", "z"]
    with pytest.raises(EvalError, match=r"prompts.txt: 2 prompts for 3 generated images"):
        match_prompts(imgs, prompts=["x", "y"], source="prompts.txt")
    with pytest.raises(EvalError, match="no prompt for img_0000.png, img_0001.png, img_0002.png"):
        match_prompts(imgs)
    for i, p in enumerate(imgs):
        p.with_suffix(".txt").write_text(f"prompt {i}\n")
    assert match_prompts(imgs) == ["prompt 0", "prompt 1", "prompt 2"]
    assert match_prompts(imgs, prompt="all") == ["all"] * 3  # an explicit prompt wins over the .txt files
    imgs[1].with_suffix(".txt").unlink()
    with pytest.raises(EvalError, match="no prompt for img_0001.png"):
        match_prompts(imgs)
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n\n\n")
    assert read_prompt_lines(f) == ["a", "b"]
    f.write_text("a\n\nb\n")
    with pytest.raises(EvalError, match="line 2 is blank"):
        read_prompt_lines(f)
    f.write_text("\n")
    with pytest.raises(EvalError, match="no prompts"):
        read_prompt_lines(f)


def test_dreambooth_prompt_lists():
    obj, live = dreambooth_templates("object"), dreambooth_templates("live")
    assert len(obj) == len(set(obj)) == 25 and len(live) == len(set(live)) == 25
    assert all("{token} {class}" in t for t in obj + live)
    assert obj[:10] == live[:10] and obj[20:] == live[20:]  # backgrounds and property changes are shared
    assert "a {token} {class} wearing a santa hat" in live and "a {token} {class} on top of a mirror" in obj
    filled = dreambooth_prompts("live", "sks", "dog", images_per_prompt=4)
    assert len(filled) == 100 and filled[:4] == ["a sks dog in the jungle"] * 4
    assert filled[-1] == "a cube shaped sks dog"
    with pytest.raises(EvalError, match="object, live"):
        dreambooth_templates("animal")
    with pytest.raises(EvalError, match="non-empty token"):
        dreambooth_prompts("object", "", "can")


def test_prompt_data_file_ships_with_the_library():
    """The prompt list lives inside the lora2_train package folder (copied with the pack) and is not git-ignored."""
    path = ROOT / "lora2_train" / "data" / "dreambooth_prompts.json"
    assert path.is_file() and json.loads(path.read_text())["images_per_prompt"] == 4
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
    assert ignored.returncode != 0, "the prompt file is git-ignored"


# ----------------------------------------------------------------------------------- folders and errors


def test_folder_listing_skips_other_files_with_a_note(tmp_path, scorer, capsys):
    from lora2_train.evaluate import embed_folder

    E.write_images(tmp_path, 2, seed=4)
    (tmp_path / "img_0000.txt").write_text("a dog")  # a prompt beside an image: not reported
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "sub").mkdir()
    images, skipped = list_images(tmp_path)
    assert [p.name for p in images] == ["img_0000.png", "img_0001.png"] and skipped == ["notes.md"]
    notes = []
    emb = embed_folder(scorer, tmp_path, "references", notes.append)
    assert emb.dino.shape[0] == 2 and notes == [f"{tmp_path}: skipped 1 non-image file: notes.md"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="empty: no images"):
        list_images(empty, "generated images")
    with pytest.raises(EvalError, match="no such folder"):
        list_images(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalError, match="broken.png: not a readable image"):
        embed_folder(scorer, tmp_path, "references")


def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_or_wrong_models_are_one_line_errors_without_downloads(models, tmp_path, monkeypatch):
    clip_dir, dino_dir = models
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    _no_network(monkeypatch)
    cases = [
        (dict(clip=str(clip_dir), dino="facebook/dino-vits16"),
         ["--dino facebook/dino-vits16: not found locally", "huggingface-cli download facebook/dino-vits16"]),
        (dict(clip="openai/clip-vit-base-patch32", dino=str(dino_dir)),
         ["--clip openai/clip-vit-base-patch32: not found locally"]),
        (dict(clip=str(clip_dir), dino=str(tmp_path / "nowhere")), ["nowhere: no such folder"]),
        (dict(clip=str(clip_dir), dino=str(tmp_path)), ["not a model folder (no config.json"]),
        (dict(clip=str(dino_dir), dino=str(dino_dir)), ["a 'vit' model, expected 'clip'"]),
        (dict(clip=str(clip_dir), dino=str(clip_dir)), ["a 'clip' model, expected 'vit'"]),
    ]
    for kwargs, parts in cases:
        with pytest.raises(EvalError) as e:
            Scorer(device="cpu", **kwargs)
        msg = str(e.value)
        assert "\n" not in msg and all(p in msg for p in parts), msg


def test_incomplete_clip_folder(models, tmp_path):
    import shutil

    clip_dir, dino_dir = models
    bare = tmp_path / "clip-no-processor"
    shutil.copytree(clip_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(EvalError, match="no image processor"):
        Scorer(str(bare), str(dino_dir), device="cpu")
    from safetensors.torch import load_file, save_file
    sd = load_file(bare / "model.safetensors")
    shutil.copy(clip_dir / "preprocessor_config.json", bare)
    save_file({k: v for k, v in sd.items() if "text_projection" not in k}, bare / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(EvalError, match="weights missing from the checkpoint .e.g. text_projection"):
        Scorer(str(bare), str(dino_dir), device="cpu")


# ------------------------------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    rc = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_table_and_one_line_errors(models, folders, tmp_path, capsys):
    clip_dir, dino_dir = models
    gen_dir, ref_dir, gen, _ = folders
    common = ["--images", gen_dir, "--references", ref_dir, "--clip", clip_dir, "--dino", dino_dir, "--device", "cpu"]
    (gen_dir / "readme.md").write_text("not an image")
    rc, out, err = _cli(capsys, *common, "--prompt", "a sks dog", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res) >= {"dino", "clip_i", "clip_t", "n_images", "n_references", "models", "per_image"}
    assert res["n_images"] == 5 and res["models"]["dino"] == str(dino_dir) and "readme.md" in err
    rc, out, _ = _cli(capsys, *common, "--prompt", "a sks dog")
    assert rc == 0 and out.splitlines()[-1].startswith("mean") and f"{res['dino']:.4f}" in out.splitlines()[-1]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\nd\n")
    rc, _, err = _cli(capsys, *common, "--prompts", prompts)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "prompts.txt: 4 prompts for 5 generated images" in err
    prompts.write_text("a\nb\nc\nd\ne\n")
    rc, out, _ = _cli(capsys, *common, "--prompts", prompts, "--json")
    assert rc == 0 and [r["prompt"] for r in json.loads(out)["per_image"]] == list("abcde")
    rc, _, err = _cli(capsys, *common, "--prompt-template", "live", "--token", "sks", "--class", "dog")
    assert rc == 1 and "--prompt-template live: 25 prompts for 5 generated images" in err
    rc, _, err = _cli(capsys, *common)  # no prompt and no .txt files
    assert rc == 1 and "no prompt for img_0000.png" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _cli(capsys, "--images", empty, *common[2:], "--prompt", "x")
    assert rc == 1 and "empty: no images" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, *common[:6], "--dino", tmp_path / "nope", "--prompt", "x")
    assert rc == 1 and "nope: no such folder" in err and len(err.strip().splitlines()) == 1


def test_prompts_command(capsys):
    assert cli.main(["prompts", "object", "--token", "sks", "--class", "teapot", "--images-per-prompt", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 50 and lines[0] == lines[1] == "a sks teapot in the jungle"


def test_hundred_images_within_a_time_budget(models, scorer, tmp_path):
    """100 generated images (64–300 px) against 4 references with the tiny models: under 20 s on 2 shared CPU
    cores (typically 2–4 s)."""
    from lora2_train.evaluate import embed_folder, evaluate_folder

    E.write_images(tmp_path / "gen", 100, seed=5)
    E.write_images(tmp_path / "ref", 4, seed=6)
    clip_dir, dino_dir = models
    fast = Scorer(str(clip_dir), str(dino_dir), device="cpu", batch_size=16)
    t0 = time.perf_counter()
    refs = embed_folder(fast, tmp_path / "ref", "references")
    res = evaluate_folder(fast, tmp_path / "gen", refs, prompt="a sks dog")
    elapsed = time.perf_counter() - t0
    print(f"100 images × 4 references scored in {elapsed:.2f} s")
    assert res["n_images"] == 100 and len(res["per_image"]) == 100
    assert elapsed < 20.0, f"{elapsed:.1f} s"


# ------------------------------------------------------------------------------------------- eval-budget


def test_parse_budget():
    from lora2_train.eval_budget import parse_budget

    assert str(parse_budget("full")) == "full"
    assert str(parse_budget("rank=8")) == str(parse_budget("max-rank=8")) == "max_rank=8"
    assert str(parse_budget("fraction=0.25")) == "fraction=0.25"
    assert parse_budget("params=1.5M").value == 1_500_000 and parse_budget("params=20k").value == 20_000
    for bad, msg in (("half", "expected full"), ("fraction=1.5", r"\(0, 1\]"), ("max_rank=2.5", "whole number"),
                     ("params=0", "positive")):
        with pytest.raises(EvalError, match=msg):
            parse_budget(bad)


def test_eval_budget_scores_each_folder_and_counts_truncated_parameters(models, scorer, tmp_path, capsys):
    """Parameter counts against the closed form Σ k_m·(in+out); each entry's scores against its folder alone."""
    import math

    from PIL import Image

    from lora2_train.evaluate import embed_folder, evaluate_folder
    from lora2_train.format import save_adapter

    clip_dir, dino_dir = models
    ranks = [4, 8, 16, 6, 12, 2]
    save_adapter(E.small_adapter(ranks, seed=1), tmp_path / "ragged.safetensors")
    save_adapter(E.small_adapter([8] * 6, seed=2), tmp_path / "fixed_r8.safetensors")
    refs = E.write_images(tmp_path / "ref", 2, seed=8, sizes=[(96, 96)])
    budgets = [("ragged", "full", 10), ("ragged", "fraction=0.5", 40), ("ragged", "max_rank=3", 80),
               ("fixed_r8", "full", 10), ("fixed_r8", "params=3072", 60)]
    argv = ["eval-budget"]
    for i, (name, b, noise) in enumerate(budgets):
        E.degraded_copies(refs, tmp_path / f"gen{i}", noise, copies=1, seed=i)
        argv += ["--entry", tmp_path / f"{name}.safetensors", b, tmp_path / f"gen{i}"]
    common = ["--references", tmp_path / "ref", "--clip", clip_dir, "--dino", dino_dir, "--device", "cpu",
              "--prompt", "a sks dog"]
    out = tmp_path / "chart.png"
    rc = cli.main([str(a) for a in argv + common + ["-o", out, "--json"]])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(stdout)
    per_module = 64 + 64
    want = [sum(ranks) * per_module, sum(math.ceil(r / 2) for r in ranks) * per_module,
            sum(min(r, 3) for r in ranks) * per_module, 48 * per_module, 3072]
    assert [e["params"] for e in res["entries"]] == want
    assert [e["label"] for e in res["entries"]] == ["ragged"] * 3 + ["fixed_r8"] * 2
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800
    reference = embed_folder(scorer, tmp_path / "ref", "references")
    for i, e in enumerate(res["entries"]):  # the same numbers as scoring that folder alone
        single = evaluate_folder(scorer, tmp_path / f"gen{i}", reference, prompt="a sks dog")
        for k in ("dino", "clip_i", "clip_t"):
            assert e[k] == pytest.approx(single[k], abs=1e-5)
    # an existing chart is kept without --overwrite; a bad entry fails in one line before any model loads
    before = out.read_bytes()
    rc = cli.main([str(a) for a in argv + common + ["-o", out]])
    assert rc == 1 and "already exists" in capsys.readouterr().err and out.read_bytes() == before
    bad = ["eval-budget", "--entry", tmp_path / "ragged.safetensors", "most", tmp_path / "gen0", *common,
           "-o", tmp_path / "c2.png"]
    rc = cli.main([str(a) for a in bad])
    err = capsys.readouterr().err
    assert rc == 1 and "budget 'most'" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "gen1" / "extra.png").write_bytes((tmp_path / "gen1" / "gen_00_0.png").read_bytes())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    rc = cli.main([str(a) for a in argv + common[:-2] + ["--prompts", prompts, "-o", tmp_path / "c3.png"]])
    err = capsys.readouterr().err
    assert rc == 1 and "2 prompts for 3 generated images in" in err and "gen1" in err
    assert not (tmp_path / "c3.png").exists()
