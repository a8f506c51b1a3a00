"""The headless ComfyUI fixture itself: our pack is imported, the KOALA-700M test checkpoint is detected and samples."""
import comfyui_harness as H
from graphs import sample_graph


def test_pack_loaded_without_import_errors(comfyui):
    info = comfyui.object_info()
    assert "LoRA2VisualizeRanks" in info, comfyui.log_tail()
    assert info["LoRA2VisualizeRanks"]["category"] == "LoRA²"
    assert "IMPORT FAILED" not in comfyui.log_tail(100_000)


def test_koala_checkpoint_samples(comfyui, koala_checkpoint):
    entry = comfyui.run(sample_graph(koala_checkpoint.name, size=128, steps=1, prefix="smoke"))
    images = H.output_images(entry, "7")
    assert len(images) == 1 and (comfyui.dirs["output"] / images[0]["filename"]).is_file()
    assert "model_type EPS" in comfyui.log_tail(100_000) or "KOALA" in comfyui.log_tail(100_000)
