"""The headless ComfyUI fixture itself: our pack is imported without errors (sampling: test_e2e_nodes.py)."""


def test_pack_loaded_without_import_errors(comfyui):
    info = comfyui.object_info()
    log = comfyui.log_tail(100_000)
    assert "IMPORT FAILED" not in log, log
    assert "LoRA2VisualizeRanks" in info, log
    for name, node in info.items():
        if name.startswith("LoRA2"):
            assert node["category"] == "LoRA²" and "LoRA²" in node["display_name"], name
    assert {"LoRA2LoadAdapter", "LoRA2ZeroPad", "LoRA2Merge", "LoRA2VisualizeRanks"} <= set(info)
