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
            assert node["category"].split("/")[0] == "LoRA²" and "LoRA²" in node["display_name"], name
    assert {"LoRA2LoadAdapter", "LoRA2ZeroPad", "LoRA2Merge", "LoRA2VisualizeRanks", "LoRA2TrainSDXL",
            "LoRA2RankSettings", "LoRA2TrainingSettings", "LoRA2Dataset", "LoRA2Samples", "LoRA2SdScripts",
            "LoRA2Train"} <= set(info)
    # the train node takes each settings node's output on an input of that type
    train = info["LoRA2TrainSDXL"]["input"]
    for socket, kind in (("rank_settings", "LoRA2RankSettings"), ("training_settings", "LoRA2TrainingSettings"),
                         ("dataset", "LoRA2Dataset"), ("samples", "LoRA2Samples"), ("sd_scripts", "LoRA2SdScripts")):
        assert train["optional"][socket][0] == info[kind]["output"][0], socket
