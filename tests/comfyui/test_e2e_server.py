"""The headless ComfyUI fixture itself: our pack is imported without errors (sampling: test_e2e_nodes.py)."""
import os

import comfyui_harness as H


def test_pack_loaded_without_import_errors(comfyui):
    info = comfyui.object_info()
    log = comfyui.log_tail(100_000)
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line]
    if os.environ.get("LORA2_COMFYUI_DIR"):  # another ComfyUI may lack optional packages of its own nodes
        failed = [line for line in failed if H.PACK_NAME in line]
    assert not failed, log
    assert "LoRA2VisualizeRanks" in info, log
    for name, node in info.items():
        if name.startswith("LoRA2"):
            assert node["category"] == "LoRA²" and "LoRA²" in node["display_name"], name
    assert {"LoRA2LoadAdapter", "LoRA2ZeroPad", "LoRA2Merge", "LoRA2VisualizeRanks"} <= set(info)
