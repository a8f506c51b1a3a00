"""Runs the Train LoRA² node's embedded training inside a ComfyUI import (no server), in its own process.

usage: python train_node_inprocess.py COMFYUI_DIR WORK_DIR
Builds a small random SDXL-architecture ComfyUI model under inference mode (as ComfyUI's checkpoint loader
does), trains 3 steps, cancels a second run after 2 of 5 steps, and prints one JSON line of findings.
"""
import hashlib
import json
import os
import sys

from comfy_inprocess import TINY_SDXL_UNET, import_pack, start_script  # (this script's own folder is on sys.path)

_, work, loras = start_script(sys.argv)

import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

train_mod = import_pack(ROOT)

from lora2_train.config import LoRA2Config  # noqa: E402
from lora2_train.format import load_adapter, output_path  # noqa: E402

UNET = TINY_SDXL_UNET

torch.manual_seed(0)
with torch.inference_mode():  # ComfyUI executes every node, checkpoint loading included, in inference mode
    base = comfy.supported_models.SDXL(UNET).get_model({})
    for p in base.diffusion_model.parameters():
        p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    pooled = torch.randn(1, 1280)
    y = base.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0, target_width=64,
                        target_height=64)
    data = [{"latents": torch.randn(4, 8, 8), "cond": {"context": torch.randn(77, 2048), "y": y[0]}}
            for _ in range(2)]


def digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# the trainer's DDPM x_t at timestep t is exactly what ComfyUI's EPS sampling feeds the UNet at σ_t
schedule = train_mod.prediction.schedule_of(base)
x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
t = torch.tensor([0, 500, 999])
sigma = base.model_sampling.sigmas[t]
comfy_in = base.model_sampling.calculate_input(sigma, x0 + eps * sigma.view(-1, 1, 1, 1))
schedule_matches = bool(torch.allclose(schedule.add_noise(x0, eps, t), comfy_in, atol=1e-5)
                        and torch.equal(base.model_sampling.timestep(sigma).long(), t))

before = digest(base)
unet_before = digest(base.diffusion_model)
inference_before = all(p.is_inference() for p in base.diffusion_model.parameters())
config = LoRA2Config(r_init=4, r_target=4, r_max=8, steps=3, resize_every=2, lr=1e-3, checkpoint_every=3)
out = output_path(loras, "inproc")
run = train_mod.progress.Run("7", config.steps)
train_mod.memory.load_for_training(patcher)
with torch.inference_mode(False), torch.enable_grad():
    adapter, history = train_mod.embedded.run_trainer(base, base.diffusion_model, data, config, out, torch.device("cpu"), "",
                                         run)
after = digest(base)
saved = load_adapter(out)
model2, _ = sys.modules["lora2_pack.nodes.load"].patch_with_adapter(patcher, None, saved, 1.0, 1.0)
import comfy.lora  # noqa: E402

key_map = comfy.lora.model_lora_keys_unet(base, {})
unmapped = [k for k in saved.modules if k not in key_map]

# gradient checkpointing of the UNet blocks gives the same training run (same seed, same data)
def two_steps(name, ckpt):
    torch.manual_seed(1)
    cfg = LoRA2Config(r_init=4, r_target=4, r_max=8, steps=2, resize_every=2, lr=1e-2, nu_lr=0.1,
                      gradient_checkpointing=ckpt)
    with torch.inference_mode(False), torch.enable_grad():
        ad, _ = train_mod.embedded.run_trainer(base, base.diffusion_model, data, cfg, output_path(loras, name),
                                  torch.device("cpu"), "", train_mod.progress.Run("9", 2))
    return ad


patched_counts = []
_enable = train_mod.unet.UNetCall.enable_gradient_checkpointing


def _counting(self):
    _enable(self)
    patched_counts.append(len(self._patched))


train_mod.unet.UNetCall.enable_gradient_checkpointing = _counting
plain, with_ckpt = two_steps("plain", False), two_steps("ckpt", True)
train_mod.unet.UNetCall.enable_gradient_checkpointing = _enable
ckpt_diff = max(float((plain.modules[k].up.float() - with_ckpt.modules[k].up.float()).abs().max())
                for k in plain.modules)
ckpt_moved = max(float(m.up.float().abs().max()) for m in plain.modules.values())
blocks_restored = not any("forward" in m.__dict__ for m in base.diffusion_model.modules()
                          if type(m).__name__ in ("BasicTransformerBlock", "ResBlock"))

# cancel path: the Cancel button sets ComfyUI's interrupt flag while training runs
config2 = LoRA2Config(r_init=4, r_target=4, r_max=8, steps=5, resize_every=2, lr=1e-3)
out2 = output_path(loras, "inproc_cancel")


class Cancel(train_mod.progress.Run):
    def step(self, ev):
        super().step(ev)
        if ev.step == 2:
            mm.interrupt_current_processing(True)


interrupted = False
with torch.inference_mode(False), torch.enable_grad():
    try:
        train_mod.embedded.run_trainer(base, base.diffusion_model, data, config2, out2, torch.device("cpu"), "",
                          Cancel("8", config2.steps))
    except mm.InterruptProcessingException:
        interrupted = True
partial = output_path(loras, "inproc_cancel_step2")

weights_after_all = digest(base)  # before a v-prediction object patch replaces model_sampling's sigma buffers

# prediction type and schedule from the model's model_sampling (ComfyUI's ModelSamplingDiscrete node patches it)
import comfy.model_sampling as MS  # noqa: E402
from lora2_train.objective import rescale_zero_terminal_snr  # noqa: E402


class VSampling(MS.ModelSamplingDiscrete, MS.V_PREDICTION):
    pass


vms = VSampling(base.model_config)
ac = rescale_zero_terminal_snr(1.0 / (1.0 + vms.sigmas.double() ** 2))
ac[-1] = 4.8973451890853435e-08  # what ComfyUI's zsnr option leaves at the last step
vms.set_sigmas(((1 - ac) / ac).sqrt())
vpatcher = patcher.clone()
vpatcher.add_object_patch("model_sampling", vms)
eps_kind = train_mod.prediction.prediction_of(patcher)[:2]
v_kind = train_mod.prediction.prediction_of(vpatcher)[:2]
v_schedule = train_mod.prediction.schedule_of(base, train_mod.prediction.prediction_of(vpatcher)[2])

# the whole node, twice with the same output name, fed latents + conditioning as ComfyUI's dataset nodes give
# them (INPUT_IS_LIST: every input a list; latents of two sizes), v-prediction with zero terminal SNR
with torch.inference_mode():
    lat_list = [{"samples": torch.randn(1, 4, 8, 8)}, {"samples": torch.randn(1, 4, 8, 16)}]
    pos_list = [[[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]] for _ in range(2)]
# the train node with its settings nodes (the essentials on it, the rest on Rank / Training Settings and Dataset)
(rank,) = train_mod.RankSettings().settings(nu_learning_rate=1e-2, r_init=4, q=0.9, lambda_r=1.0, lambda_e=0.0)
(training,) = train_mod.TrainingSettings().settings(save_every_n_steps=2, gradient_accumulation_steps=2,
                                                    lr_scheduler="cosine", lr_warmup_steps=1, min_snr_gamma=5.0)
(dataset,) = train_mod.DatasetSettings().run(latents=lat_list, positive=pos_list)
inputs = dict(model=vpatcher, clip=None, vae=None, dataset_path="", instance_prompt="", steps=3, learning_rate=1e-3,
              r_max=8, r_target=4, seed=0, resolution=64, batch_size=1, target_modules="attn", backend="embedded",
              output_name="twice", unique_id="5", rank_settings=rank, training_settings=training, dataset=dataset)
runs = []
for _ in range(2):
    with torch.inference_mode():  # as ComfyUI executes nodes
        res = train_mod.TrainLoRA2().train(**inputs)
    runs.append(res)
twice = [r["ui"]["lora2_saved"][0] for r in runs]
unet_kept = digest(base.diffusion_model) == unet_before
twice_info = [r["result"][4] for r in runs]
twice_meta = json.loads(load_adapter(output_path(loras, twice[1])).metadata["lora2_config"])
snapshot_files = sorted(p.name for p in __import__("pathlib").Path(loras).glob("twice*_step*"))
ckpt = os.path.join(work, "output", "lora2_checkpoints", "inproc_cancel", "checkpoint.pt")
state = torch.load(ckpt, weights_only=True)
print(json.dumps({
    "schedule_matches": schedule_matches,
    "ckpt_same_ranks": plain.ranks() == with_ckpt.ranks(), "ckpt_diff": ckpt_diff, "ckpt_moved": ckpt_moved,
    "blocks_restored": blocks_restored, "ckpt_blocks": patched_counts,
    "weights_identical": before == after == weights_after_all,
    "inference_before": inference_before,
    
    "requires_grad_after": any(p.requires_grad for p in base.diffusion_model.parameters()),
    "ranks": saved.ranks(),
    "num_modules": len(saved.modules),
    "unmapped": unmapped,
    "patched_keys": len(model2.patches),
    "base_patches": len(patcher.patches),
    "history_steps": [h["step"] for h in history],
    "history_losses_finite": all(h["loss"] == h["loss"] for h in history),
    "metadata_steps": saved.metadata.get("lora2_steps"),
    "interrupted": interrupted,
    "flag_cleared": not mm.processing_interrupted(),
    "partial_exists": partial.exists(),
    "partial_meta": load_adapter(partial).metadata.get("lora2_interrupted") if partial.exists() else None,
    "final_absent": not out2.exists(),
    "checkpoint_step": int(state["step"]),
    "eps_kind": list(eps_kind), "v_kind": list(v_kind),
    "v_schedule_last": float(v_schedule.alphas_cumprod[-1]), "v_schedule_first": float(v_schedule.alphas_cumprod[0]),
    "unet_kept": unet_kept, "twice": twice, "twice_info": twice_info, "snapshots": snapshot_files,
    "twice_prediction": twice_meta.get("prediction_type"), "twice_zsnr": twice_meta.get("zero_terminal_snr"),
    "twice_accum": twice_meta.get("gradient_accumulation_steps"),
}))
