"""Train LoRA² node, embedded backend, run inside a real ComfyUI import (own process, no server)."""
import json
import subprocess
import sys
from pathlib import Path

from lora2_train.config import LoRA2Config

SCRIPT = Path(__file__).with_name("train_node_inprocess.py")


def test_embedded_training_on_a_comfyui_unet(comfyui_dir, tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), str(comfyui_dir), str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])
    assert f["schedule_matches"], "trainer noise schedule differs from ComfyUI's EPS model sampling"
    # gradient checkpointing (UNet blocks recomputed in backward) trains the same adapter
    assert f["ckpt_blocks"] == [7 + 11]  # the test UNet's 7 transformer blocks and 11 ResBlocks, wrapped once
    assert f["ckpt_same_ranks"] and f["blocks_restored"]
    assert f["ckpt_moved"] > 1e-3 and f["ckpt_diff"] <= 1e-3 * f["ckpt_moved"], (f["ckpt_diff"], f["ckpt_moved"])
    # the cached base model: same bytes, requires_grad flags as before (ComfyUI loads weights as inference
    # tensors; training swaps them for autograd-usable tensors holding the same bits)
    assert f["weights_identical"] and f["inference_before"]
    assert f["requires_grad_after"]
    # the saved adapter: one module per attention projection, every key known to ComfyUI's LoRA loader
    assert f["num_modules"] == 56 and f["unmapped"] == []
    assert f["patched_keys"] == 56 and f["base_patches"] == 0
    assert all(r in (4, 8) for r in f["ranks"].values())
    assert f["metadata_steps"] == "3" and f["history_steps"] == [1, 2, 3] and f["history_losses_finite"]
    # Cancel: interrupt raised (flag consumed), partial adapter + resumable checkpoint kept, no final file
    assert f["interrupted"] and f["flag_cleared"]
    assert f["partial_exists"] and f["partial_meta"] == "true" and f["final_absent"]
    assert f["checkpoint_step"] == 2
    # ε / v-prediction and zero terminal SNR come from the model's model_sampling (object patch included)
    assert f["eps_kind"] == ["epsilon", False] and f["v_kind"] == ["v_prediction", True]
    assert f["v_schedule_last"] < 1e-7 and abs(f["v_schedule_first"] - (1 - 0.00085)) < 1e-6
    # queued twice with one output name: the second run saves name_2 and says so; snapshots every 2 steps
    assert f["twice"] == ["twice.safetensors", "twice_2.safetensors"] and f["unet_kept"]
    assert f["twice_info"][0].startswith("saved twice.safetensors: ")
    assert f["twice_info"][1].startswith("saved twice_2.safetensors (twice.safetensors was taken): ")
    assert f["snapshots"] == ["twice_2_step2.safetensors", "twice_step2.safetensors"]
    assert f["twice_prediction"] == "v_prediction" and f["twice_zsnr"] is True and f["twice_accum"] == 2


SD_SCRIPT = Path(__file__).with_name("train_node_sd_scripts_inprocess.py")


def test_sd_scripts_backend_samples_cancel_and_resume(comfyui_dir, tmp_path):
    """The node's sd-scripts path against the stand-in checkout: Cancel leaves a state folder the message names,
    resume_from that folder finishes the run, and its sample images come back as one IMAGE batch."""
    r = subprocess.run([sys.executable, str(SD_SCRIPT), str(comfyui_dir), str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])
    assert f["interrupted"] and f["flag_cleared"]
    assert "cancelled" in f["note"] and f["state"].endswith("-state") and "cut-step0000000" in f["state"]
    stopped = int(f["state"].rsplit("step", 1)[1].split("-")[0])
    assert f["resumed_steps"] == list(range(stopped + 1, 5)) and f["resumed_history_steps"][-1] == 4
    assert f["resumed_final"] and f["resumed_ranks_moved"]
    # the samples of the resumed run (step 4), in prompt order, as one batch
    assert [s[:13] for s in f["samples"]] == ["cut_000004_00", "cut_000004_01"]
    assert f["batch_shape"] == [2, 48, 64, 3]  # the 64×64 prompt resized to the first image's size
    # the chart gets each once (with the next progress message, or the final one), copied to the temp folder
    assert f["chart"] == [["cut_000004_00", 4, 0, "temp", True], ["cut_000004_01", 4, 1, "temp", True]]


TE_SCRIPT = Path(__file__).with_name("train_node_te_inprocess.py")


def test_embedded_training_of_the_text_encoders(comfyui_dir, tmp_path):
    """target_modules attn+te_attn on the embedded backend: the captions go through ComfyUI's CLIP (CLIP-L ‖ CLIP-G,
    CLIP-G's pooled output into the ADM vector) in every step, the text-encoder LoRAs train at text_encoder_lr, and
    the saved lora_te1_/lora_te2_ keys load back onto the same CLIP modules."""
    r = subprocess.run([sys.executable, str(TE_SCRIPT), str(comfyui_dir), str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])
    # the per-step encoding is ComfyUI's own (encode_from_tokens + encode_adm), one row per example
    assert f["encode_matches"] and f["context_shape"] == [3, 77, 64 + 128]
    # q/k/v/out of the 3 layers of each encoder, besides the U-Net's 56 attention projections
    assert f["num_modules"] == 56 + 24
    for te in ("te1", "te2"):
        assert f[f"{te}_keys"] == sorted(f"lora_{te}_text_model_encoder_layers_{i}_self_attn_{p}"
                                         for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    block = LoRA2Config.rank_block  # learned, ragged ranks in whole rank blocks, at most r_max 16
    assert len(f["te_ranks"]) > 1 and set(f["all_ranks"]) <= set(range(block, 17, block))
    # own optimizer group at text_encoder_lr: 2 factors × 24 modules
    assert f["groups"] == [["lora", 1e-3, 2 * 56], ["lora_te", 3e-3, 2 * 24], ["nu", 2.0, 80]]
    assert f["config_te_lr"] == 3e-3 and f["config_targets"] == ["attn1", "attn2", "te_attn"]
    # gradients reached both encoders (B starts at 0); CLIP-L's last layer, whose output SDXL does not use
    # (penultimate hidden state, CLIP-L's pooled output unused), got none
    assert f["te1_moved"] == 8 and f["te2_moved"] == 12 and f["te1_last_layer_moved"] == 0
    # base weights untouched; the loader patches 24 CLIP weights and the conditioning moves by exactly ΔW
    assert f["clip_kept"] and f["unet_kept"] and f["loaded_clip_patches"] == 24
    assert f["cond_change"] > 1e-2 and f["pooled_change"] > 1e-3
    assert f["cond_vs_reference"] <= 1e-3 * f["cond_change"] and f["pooled_vs_reference"] <= 1e-3 * f["pooled_change"]
    assert f["info"].startswith("saved te.safetensors: 80 modules")
    # samples at step 4 encode their prompt through the encoders as trained (the saved file's ΔW, up to its fp16
    # rounding), not through the base CLIP
    assert f["samples_shape"] == [1, 64, 64, 3] and f["sampled_encodings"] == 1
    assert f["sample_cond_vs_base"] > 0.5 * f["cond_change"]
    assert f["sample_cond_vs_reference"] <= 1e-2 * f["cond_change"], (f["sample_cond_vs_reference"], f["cond_change"])
    # latents + positive (conditioning encoded before the node) with text-encoder targets: one line, nothing written
    assert f["refusal"].startswith("target_modules: text-encoder targets recompute the captions' conditioning")
    assert "\n" not in f["refusal"] and f["refused_nothing_written"]


SPLIT_SCRIPT = Path(__file__).with_name("train_node_split_inprocess.py")
#: the adapter the one-node Train LoRA² trained with the script's settings before the settings nodes existed
#: (sha256 of its tensors, by torch version, CPU kernels and thread count: the arithmetic's order depends on all
#: three)
BEFORE_SPLIT = {("2.14.1", "AVX512", 2): "e267c4572a21a72f9e63effc6acda69c124e74bd5ce30adc949f85a7e49206b0",
                ("2.14.1", "AVX512", 1): "6cdc6fed47b653b929645a0b8db10c9532e730decb560f3495132f73f4f4bdc5"}


def test_settings_nodes_train_the_adapter_of_the_one_node_version(comfyui_dir, tmp_path):
    r = subprocess.run([sys.executable, str(SPLIT_SCRIPT), str(comfyui_dir), str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    f = json.loads(r.stdout.strip().splitlines()[-1])
    # the same settings on the earlier all-inputs node and on the new node + settings nodes: the same bits
    assert f["split"] == f["legacy"]
    # and the bits the node trained before the split, where the arithmetic is the same (torch, kernels, threads)
    before = BEFORE_SPLIT.get((f["torch"].split("+")[0], f["cpu"], f["threads"]))
    if before is not None:
        assert f["legacy"] == before
