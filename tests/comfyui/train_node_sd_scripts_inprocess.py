"""Runs the Train LoRA² node's sd-scripts backend inside a ComfyUI import (no server), in its own process, against
the sd-scripts stand-in tests/fake_sd_scripts (this Python as sd-scripts' Python).

usage: python train_node_sd_scripts_inprocess.py COMFYUI_DIR WORK_DIR
Trains with two sample prompts every 2 of 4 steps, cancels after step 2, resumes from the state folder the Cancel
left, and prints one JSON line of findings.
"""
import json
import os
import sys

comfy_dir, work = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfy_dir)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import logging  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKE = os.path.join(ROOT, "tests", "fake_sd_scripts")
loras, ckpts, data = (os.path.join(work, d) for d in ("loras", "checkpoints", "data"))
for d in (loras, ckpts, data):
    os.makedirs(d, exist_ok=True)
folder_paths.folder_names_and_paths["loras"] = ([loras], {".safetensors"})
folder_paths.folder_names_and_paths["checkpoints"] = ([ckpts], {".safetensors"})
folder_paths.set_output_directory(os.path.join(work, "output"))
folder_paths.set_temp_directory(os.path.join(work, "temp"))
open(os.path.join(ckpts, "sdxl.safetensors"), "wb").write(b"x")  # the stand-in builds its own U-Net
Image.new("RGB", (64, 64), (200, 100, 50)).save(os.path.join(data, "a.png"))

from comfy_inprocess import import_pack  # noqa: E402  (this script's own folder is on sys.path)

train_mod = import_pack(ROOT)

from lora2_train.config import LoRA2Config  # noqa: E402
from lora2_train.format import output_path  # noqa: E402
from lora2_train.kohya import launch  # noqa: E402

launch.check_requirements = lambda python, folder: None  # this Python runs the stand-in, not sd-scripts


def config(steps):
    return LoRA2Config(r_init=8, r_target=8, r_max=16, lambda_r=0.0, nu_lr=3.0, resize_every=2, rank_block=1,
                       lr=0.05, steps=steps, seed=3)


def train(name, run, **kw):
    inputs = dict(dataset_path=data, images=None, captions="", instance_prompt="photo of sks", resolution=64,
                  sd_scripts_path=FAKE, python_path=sys.executable, base_checkpoint="sdxl.safetensors",
                  num_processes=1, sample_prompts="", sample_every_n_steps=0, sample_sampler="euler_a",
                  resume_from="")
    inputs.update(kw)
    return train_mod.sd_scripts.train_sd_scripts(config(4), output_path(loras, name), inputs, run)


PROMPTS = dict(sample_prompts="a dog --w 64 --h 48\n\na cat\n", sample_every_n_steps=2)


class Cancel(train_mod.progress.Run):
    def step(self, ev):
        super().step(ev)
        if ev.step == 2:
            mm.interrupt_current_processing(True)


messages = []
logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})())
os.environ["FAKE_SD_STEP_SLEEP"] = "0.3"
interrupted = False
try:
    train("cut", Cancel("2", 4), **PROMPTS)
except mm.InterruptProcessingException:
    interrupted = True
os.environ["FAKE_SD_STEP_SLEEP"] = "0"
note = next((m for m in messages if "cancelled" in m), "")
state = note.split("set resume_from to ", 1)[1].split(" to continue")[0] if "set resume_from to " in note else ""


class Steps(train_mod.progress.Run):
    seen = []
    shown = []  # (step of the message, sample references it carries) for the chart

    def step(self, ev):
        super().step(ev)
        self.seen.append(ev.step)

    def send(self, **data):
        if data.get("samples"):
            self.shown.append((data.get("step"), data["samples"]))
        super().send(**data)


steps_run = Steps("3", 4)
resumed, resumed_history, samples = train("cut", steps_run, resume_from=state, **PROMPTS) if state else \
    (None, [], [])
# what the chart gets: sent with a progress message, or left for the node's final message
chart = [r for _, refs in Steps.shown for r in refs] + steps_run.take_samples().get("samples", [])
batch = train_mod.samples.images_tensor(samples)

print(json.dumps({
    "samples": [os.path.basename(p) for p in samples], "batch_shape": list(batch.shape),
    "interrupted": interrupted, "flag_cleared": not mm.processing_interrupted(), "note": note, "state": state,
    "resumed_steps": Steps.seen,
    "chart": [(r["filename"][:13], r["step"], r["prompt"], r["type"],
               os.path.isfile(os.path.join(work, "temp", r["subfolder"], r["filename"]))) for r in chart], "resumed_history_steps": [h["step"] for h in resumed_history],
    "resumed_final": os.path.exists(output_path(loras, "cut")),
    "resumed_ranks_moved": len(set(resumed.ranks().values())) > 1 if resumed else False,
}))
