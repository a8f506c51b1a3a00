"""Our nodes inside a real ComfyUI, driven over HTTP only: discovery, load → sample → chart, pad and merge
through the graph, and bad inputs that fail one prompt with a clear node error while the server keeps serving."""
import json

import numpy as np
import torch
from PIL import Image

import comfyui_harness as H
from adapters import random_adapter, trainer_keys
import workflows as W
from graphs import sample_graph

SIZE = 128  # image side in pixels: a 16×16 latent keeps CPU sampling short


def _image(comfyui, entry, node, folder="output"):
    images = H.output_images(entry, node)
    assert len(images) == 1, entry.get("outputs")
    img = images[0]
    path = comfyui.dirs[img.get("type", folder)] / img.get("subfolder", "") / img["filename"]
    return np.asarray(Image.open(path).convert("RGB"))


def test_nodes_listed_with_their_inputs(comfyui, koala_lora):
    info = comfyui.object_info()
    load = info["LoRA2LoadAdapter"]
    assert load["display_name"] == "Load LoRA² Adapter" and load["category"] == "LoRA²"
    req = load["input"]["required"]
    assert list(req) == ["model", "clip", "lora_name", "strength_model", "strength_clip", "rank_budget",
                         "budget_mode"]
    assert req["model"][0] == "MODEL" and req["clip"][0] == "CLIP"
    assert koala_lora[0] in comfyui.object_info("LoRA2LoadAdapter")["LoRA2LoadAdapter"]["input"]["required"][
        "lora_name"][0]
    assert req["budget_mode"][0] == ["max rank", "fraction", "parameters (millions)"]
    assert load["output"] == ["MODEL", "CLIP", "LORA2_INFO"]

    pad = info["LoRA2ZeroPad"]
    assert pad["display_name"] == "Zero-Pad LoRA² Adapter" and pad["output_node"] is True
    assert pad["output"] == ["STRING", "LORA2_INFO"]
    merge = info["LoRA2Merge"]
    assert merge["display_name"] == "Merge LoRA² Adapters" and merge["output_node"] is True
    assert {"lora_1", "weight_1", "lora_2", "weight_2", "mode", "rank", "energy"} <= set(merge["input"]["required"])
    assert {"lora_3", "weight_3", "lora_4", "weight_4"} == set(merge["input"]["optional"])
    assert merge["input"]["required"]["mode"][0] == ["exact", "exact + SVD resize (rank)",
                                                     "exact + SVD resize (energy)", "pad-average"]
    vis = info["LoRA2VisualizeRanks"]
    assert {k: v[0] for k, v in vis["input"]["optional"].items() if k != "compare_with"} == {
        "adapter": "LORA2", "info": "LORA2_INFO", "history": "LORA2_HISTORY"}


def test_load_with_budget_sample_and_chart(comfyui_alive, koala_checkpoint, koala_lora):
    """The load → sample example workflow (rank budget: max rank 32), at 128² and 2 steps, against the same
    graph without the LoRA node."""
    comfyui = comfyui_alive
    name, adapter = koala_lora
    graph = json.loads(json.dumps(W.load_and_sample()).replace(W.CKPT, koala_checkpoint.name).replace(W.LORA, name))
    graph["5"]["inputs"].update(width=SIZE, height=SIZE)
    graph["6"]["inputs"].update(steps=2)
    graph["8"]["inputs"]["filename_prefix"] = "lora"
    base = {k: json.loads(json.dumps(v).replace('["2", 0]', '["1", 0]').replace('["2", 1]', '["1", 1]'))
            for k, v in graph.items() if k not in ("2", "9", "10")}
    base["8"]["inputs"]["filename_prefix"] = "base"
    entry_base = comfyui.run(base)
    entry = comfyui.run(graph)
    img_base, img_lora = _image(comfyui, entry_base, "8"), _image(comfyui, entry, "8")
    assert img_base.shape == img_lora.shape == (SIZE, SIZE, 3)
    assert np.abs(img_base.astype(int) - img_lora.astype(int)).mean() > 1.0, "the LoRA did not change the image"
    chart = H.output_images(entry, "10")
    assert len(chart) == 1 and chart[0]["type"] == "temp"
    ranks = entry["outputs"]["2"]["lora2_ranks"][0]  # what the loader shows in the browser
    assert ranks["ranks"] == {k: min(r, 32) for k, r in adapter.ranks().items()}
    assert ranks["full_ranks"] == adapter.ranks()
    log = comfyui.log_tail(200_000)
    assert "lora key not loaded" not in log and "NOT LOADED" not in log


def _saved(entry, node):
    return entry["outputs"][node]["text"][0]


def test_pad_and_merge_write_new_files_with_expected_ranks(comfyui_alive, small_pair):
    from lora2_train.format import load_adapter

    comfyui = comfyui_alive
    a, b = small_pair
    ra, rb = a.ranks(), b.ranks()
    merge = {"lora_1": "pair_a.safetensors", "weight_1": 1.0, "lora_2": "pair_b.safetensors", "weight_2": 0.5,
             "rank": 8, "energy": 0.9, "dtype": "fp32"}
    graph = {
        "1": {"class_type": "LoRA2ZeroPad", "inputs": {"lora_name": "pair_a.safetensors", "rank": 0,
                                                       "output_name": "", "dtype": "fp16"}},
        "2": {"class_type": "LoRA2Merge", "inputs": dict(merge, mode="exact", output_name="m_exact")},
        "3": {"class_type": "LoRA2Merge", "inputs": dict(merge, mode="exact + SVD resize (rank)",
                                                         output_name="m_svd")},
        "4": {"class_type": "LoRA2Merge", "inputs": dict(merge, mode="pad-average", output_name="m_avg")},
        "7": {"class_type": "LoRA2Merge", "inputs": dict(merge, mode="exact + SVD resize (energy)",
                                                         output_name="m_energy")},
        "5": {"class_type": "LoRA2VisualizeRanks", "inputs": {"lora_name": "pair_a.safetensors",
                                                              "compare_with": "pair_b.safetensors",
                                                              "info": ["2", 1]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
    entry = comfyui.run(graph)
    loras = comfyui.dirs["loras"]
    top = max(ra.values())
    assert _saved(entry, "1").startswith(f"pair_a_padded_r{top}")  # a _2 … suffix when the name is taken
    assert load_adapter(loras / _saved(entry, "1")).ranks() == {k: top for k in ra}
    exact = load_adapter(loras / "m_exact.safetensors")
    assert exact.ranks() == {k: ra[k] + rb.get(k, 0) for k in ra}
    k0 = next(iter(rb))
    fa, fb = load_adapter(loras / "pair_a.safetensors"), load_adapter(loras / "pair_b.safetensors")
    torch.testing.assert_close(exact.modules[k0].delta_weight(),  # ΔW = ΔW_a + 0.5 ΔW_b (saved as fp32)
                               fa.modules[k0].delta_weight() + 0.5 * fb.modules[k0].delta_weight(),
                               rtol=1e-4, atol=1e-6)
    assert load_adapter(loras / "m_svd.safetensors").ranks() == {k: min(8, ra[k] + rb.get(k, 0)) for k in ra}
    assert load_adapter(loras / "m_avg.safetensors").ranks() == {k: max(ra[k], rb.get(k, 0)) for k in ra}
    energy = load_adapter(loras / "m_energy.safetensors").ranks()  # smallest rank keeping 90 % of Σσ²
    assert energy.keys() == exact.ranks().keys()
    assert all(1 <= energy[k] <= exact.ranks()[k] for k in energy) and energy != exact.ranks()
    assert len(H.output_images(entry, "6")) == 1

    # the same names again: nothing is overwritten, the new files get a suffix
    before = (loras / "m_exact.safetensors").read_bytes()
    graph2 = {"2": {"class_type": "LoRA2Merge", "inputs": dict(merge, mode="exact", output_name="m_exact",
                                                               dtype="fp16")}}
    entry2 = comfyui.run(graph2)
    assert _saved(entry2, "2") == "m_exact_2.safetensors"
    assert (loras / "m_exact.safetensors").read_bytes() == before
    assert load_adapter(loras / "m_exact_2.safetensors").ranks() == exact.ranks()


def _node_error(comfyui, graph, node_type):
    entry = comfyui.run(graph, expect_success=False)
    assert H.status_str(entry) == "error", entry
    err = H.execution_error(entry)
    assert err is not None and err["node_type"] == node_type, err
    return err["exception_message"]


def test_bad_inputs_fail_one_prompt_with_a_clear_error(comfyui_alive, koala_checkpoint, koala_lora, small_pair):
    comfyui = comfyui_alive
    loras = comfyui.dirs["loras"]
    (loras / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, loras / "pickled.pt")
    from lora2_train.format import LoRAModule, save_adapter

    sdxl_only = random_adapter(trainer_keys("sdxl", ("attn1",)), lambda i, k: 4, seed=6)
    sdxl_only.modules = {k: m for k, m in sdxl_only.modules.items() if "input_blocks_7_1_transformer_blocks_9_" in k}
    sdxl_only.modules["lora_unet_no_such_module"] = LoRAModule(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)
    save_adapter(sdxl_only, loras / "sdxl_only.safetensors")

    def load_graph(name):
        return sample_graph(koala_checkpoint.name, size=64, steps=1, prefix="bad", lora={
            "class_type": "LoRA2LoadAdapter",
            "inputs": {"lora_name": name, "strength_model": 1.0, "strength_clip": 1.0, "rank_budget": 0,
                       "budget_mode": "max rank"}})

    msg = _node_error(comfyui, load_graph("corrupt.safetensors"), "LoRA2LoadAdapter")
    assert "corrupt.safetensors" in msg and "\n" not in msg.strip()
    msg = _node_error(comfyui, load_graph("pickled.pt"), "LoRA2LoadAdapter")
    assert "pickled.pt" in msg and "pickle" in msg
    msg = _node_error(comfyui, load_graph("sdxl_only.safetensors"), "LoRA2LoadAdapter")
    assert "sdxl_only.safetensors" in msg and "name no weight" in msg and "lora_unet_no_such_module" in msg
    assert "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q" in msg and "5 of 5" in msg
    pad = {"1": {"class_type": "LoRA2ZeroPad", "inputs": {"lora_name": "corrupt.safetensors", "rank": 0,
                                                          "output_name": "", "dtype": "fp16"}}}
    msg = _node_error(comfyui, pad, "LoRA2ZeroPad")
    assert "corrupt.safetensors" in msg
    merge = {"1": {"class_type": "LoRA2Merge", "inputs": {
        "lora_1": "pair_a.safetensors", "weight_1": 1.0, "lora_2": "pickled.pt", "weight_2": 1.0, "mode": "exact",
        "rank": 8, "energy": 0.9, "output_name": "never_written", "dtype": "fp16"}}}
    msg = _node_error(comfyui, merge, "LoRA2Merge")
    assert "pickled.pt" in msg and not list(loras.glob("never_written*"))

    # a refused value is caught at validation (HTTP 400 with node_errors) and nothing runs
    answer = comfyui.run({"1": {"class_type": "LoRA2ZeroPad", "inputs": {"lora_name": "missing.safetensors",
                                                                         "rank": 0, "output_name": "",
                                                                         "dtype": "fp16"}}},
                         expect_success=False)
    assert "refused" in answer and "1" in answer["refused"]["node_errors"], json.dumps(answer)

    # the server keeps serving: the next prompt succeeds
    ok = comfyui.run({"1": {"class_type": "LoRA2VisualizeRanks", "inputs": {"lora_name": koala_lora[0]}},
                      "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
    assert len(H.output_images(ok, "2")) == 1
