"""The example workflows: files in sync with their definitions, UI files well formed, API graphs run."""
import json

import pytest

import comfyui_harness as H
import workflows as W


@pytest.fixture(scope="module")
def object_info(comfyui):
    return comfyui.object_info()


@pytest.mark.parametrize("name", sorted(W.EXAMPLES))
def test_example_files_match_their_definitions(name, object_info):
    graph = W.EXAMPLES[name]()
    assert json.loads((W.OUT / f"{name}_api.json").read_text()) == graph, \
        "example out of date: run python tests/comfyui/workflows.py"
    assert json.loads((W.OUT / f"{name}.json").read_text()) == W.api_to_ui(graph, object_info), \
        "example out of date: run python tests/comfyui/workflows.py"


@pytest.mark.parametrize("name", sorted(W.EXAMPLES))
def test_ui_workflow_is_well_formed(name, object_info):
    ui = json.loads((W.OUT / f"{name}.json").read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == len(ui["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == typ == inp["type"], (name, link_id)
    for n in nodes.values():
        info = object_info[n["type"]]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        linked = {i["name"] for i in n["inputs"] if "widget" not in i}  # converted widgets keep their value
        widgets = [k for k, s in specs.items() if W._is_widget(s) and k not in linked]
        assert all(i["name"] in specs and W._is_widget(specs[i["name"]]) for i in n["inputs"] if "widget" in i)
        assert len(n["widgets_values"]) == len(widgets) + len(W.SEED_INPUTS & set(widgets)), n["type"]
        assert [o["type"] for o in n["outputs"]] == info["output"]


def _substitute(graph, names):
    text = json.dumps(graph)
    for old, new in names.items():
        text = text.replace(json.dumps(old), json.dumps(new))
    return json.loads(text)


def test_visualize_and_pad_merge_examples_run(comfyui_alive, small_pair):
    comfyui = comfyui_alive
    names = {W.LORA: "pair_a.safetensors", W.LORA_B: "pair_b.safetensors"}
    entry = comfyui.run(_substitute(W.visualize(), names))
    assert len(H.output_images(entry, "2")) == 1
    entry = comfyui.run(_substitute(W.pad_and_merge(), names))
    merged = entry["outputs"]["2"]["text"][0]
    assert merged.startswith("merged") and (comfyui.dirs["loras"] / merged).is_file()
    assert len(H.output_images(entry, "4")) == 1
