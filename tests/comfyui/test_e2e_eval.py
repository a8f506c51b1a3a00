"""Score Images (DINO / CLIP) inside a real ComfyUI: the budget-evaluation example workflow, run at 64² with one
sampling step and a small attn1-only adapter (``small_pair``), its two scored images checked against the library
scoring the PNG files the workflow saved."""
import json

import pytest

import comfyui_harness as H
import eval_models as E
import workflows as W


def test_budget_eval_workflow_scores_both_budgets(comfyui_alive, koala_checkpoint, small_pair):
    from lora2_train.evaluate import Scorer, embed_folder

    comfyui = comfyui_alive
    clip_dir, dino_dir = E.make_models(comfyui.comfy_dir / "models" / "lora2_eval")
    E.write_images(comfyui.dirs["input"] / "eval_refs", 3, seed=2)
    info = comfyui.object_info("LoRA2ScoreImages")["LoRA2ScoreImages"]
    assert info["display_name"] == "LoRA² Score Images (DINO / CLIP)"
    assert info["output"] == ["FLOAT", "FLOAT", "FLOAT", "STRING"]
    assert info["input"]["required"]["dino_model"][0] == ["clip-tiny", "dino-tiny"]  # models/lora2_eval

    names = {W.CKPT: koala_checkpoint.name, W.LORA: "pair_a.safetensors", W.EVAL_DINO: "dino-tiny",
             W.EVAL_CLIP: "clip-tiny", W.REFERENCES: "eval_refs"}
    text = json.dumps(W.budget_eval())
    for old, new in names.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    graph = json.loads(text)
    graph["20"]["inputs"].update(width=64, height=64, batch_size=1)
    for sampler in ("6", "16"):
        graph[sampler]["inputs"]["steps"] = 1
    entry = comfyui.run(graph)

    scorer = Scorer(str(clip_dir), str(dino_dir), device="cpu")
    refs = embed_folder(scorer, comfyui.dirs["input"] / "eval_refs", "references")
    got = {}
    for save, score in (("8", "9"), ("18", "19")):
        files = [comfyui.dirs["output"] / im.get("subfolder", "") / im["filename"]
                 for im in H.output_images(entry, save)]
        assert len(files) == 1
        ui = entry["outputs"][score]["lora2_scores"][0]
        assert entry["outputs"][score]["text"][0].startswith("DINO ")
        want = scorer.score(scorer.embed_images(files), refs, ["a sks dog on the beach"])
        assert (ui["n_images"], ui["n_references"]) == (1, 3)
        for k in ("dino", "clip_i", "clip_t"):
            assert ui[k] == pytest.approx(want[k], abs=1e-5), (score, k)
        assert [r["prompt"] for r in ui["per_image"]] == ["a sks dog on the beach"]
        got[score] = ui
    assert got["9"]["dino"] != got["19"]["dino"], "the two budgets scored the same images"
