"""The headless ComfyUI fixture itself: our pack is imported without errors (sampling: test_e2e_nodes.py)."""
def test_pack_loaded_without_import_errors(comfyui):
    info = comfyui.object_info()
    assert "LoRA2VisualizeRanks" in info, comfyui.log_tail()
    assert info["LoRA2VisualizeRanks"]["category"] == "LoRA²"
    assert "IMPORT FAILED" not in comfyui.log_tail(100_000)
