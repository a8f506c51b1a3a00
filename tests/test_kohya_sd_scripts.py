"""Against a real sd-scripts checkout: skipped unless SD_SCRIPTS_DIR is set.

SD_SCRIPTS_PYTHON (default: this Python) must have sd-scripts' requirements.  The checks run in that
interpreter: the trainer extension's hooks resolve on the checkout's SdxlNetworkTrainer, LoRA²'s module
names on sd-scripts' own SDXL U-Net and CLIP encoders equal the names of sd-scripts' networks.lora, a
LoRA² file with ragged ranks loads through networks.lora.create_network_from_weights, the options the launcher
writes for samples, state and resume exist, train_network.py builds network, optimizer and accelerate state in
the order resume relies on, and it averages the network's gradients across processes with accelerator.reduce.
"""
import json
import os
import subprocess
import sys

import pytest

from lora2_train.kohya.launch import REPO_ROOT, check_sd_scripts

SD = os.environ.get("SD_SCRIPTS_DIR")
PY = os.environ.get("SD_SCRIPTS_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not SD, reason="SD_SCRIPTS_DIR is not set (no sd-scripts checkout)")

SCRIPT = r"""
import json, sys
import torch
from accelerate import init_empty_weights
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from lora2_train.kohya import network as kn
from lora2_train.kohya.train import import_sd_scripts, make_trainer_class
from lora2_train.format import Adapter, LoRAModule, save_adapter

sdxl_train_network, train_util = import_sd_scripts(sys.argv[1])
trainer = make_trainer_class(sdxl_train_network.SdxlNetworkTrainer)()
from library import sdxl_original_unet
from networks import lora as kohya_lora

with init_empty_weights():  # full SDXL shapes, no memory
    unet = sdxl_original_unet.SdxlUNet2DConditionModel()
    cfg = lambda h, i, n, a: CLIPTextConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                            num_attention_heads=a, max_position_embeddings=77)
    te1, te2 = CLIPTextModel(cfg(768, 3072, 12, 12)), CLIPTextModelWithProjection(cfg(1280, 5120, 32, 20))
ours = kn.create_network(1.0, 4, 1, None, [te1, te2], unet, targets="attn1,attn2,ff,proj,resnet,te_attn,te_mlp")
theirs = kohya_lora.create_network(1.0, 4, 1, None, [te1, te2], unet, conv_dim=4)
their_names = {l.lora_name for l in theirs.unet_loras + theirs.text_encoder_loras}
our_names = set(ours.layers)
shapes = {k: (l.in_dim, l.out_dim, l.kernel) for k, l in ours.layers.items()}
ours.close()

# a ragged-rank file with LoRA² names and the model's shapes, loaded by sd-scripts' own loader
g = torch.Generator().manual_seed(0)
modules = {}
for i, (k, (i_dim, o_dim, kern)) in enumerate(sorted(shapes.items())):
    if "attn" not in k:
        continue
    r = [1, 3, 8, 13][i % 4]
    down = torch.randn((r, i_dim, *kern), generator=g) * 0.01
    up = torch.randn((o_dim, r) + ((1, 1) if kern else ()), generator=g) * 0.01
    modules[k] = LoRAModule(down, up, float(r))
path = sys.argv[2]
save_adapter(Adapter(modules, {"ss_network_module": "networks.lora"}), path, dtype="fp16", overwrite=True)
net, sd = kohya_lora.create_network_from_weights(1.0, path, None, [te1, te2], unet)
net.apply_to([te1, te2], unet, True, True)  # registers the modules, as train_network.py does before loading
info = net.load_weights(path)
loaded = {l.lora_name: l.lora_down.weight.shape[0] for l in net.unet_loras + net.text_encoder_loras}

# the options the launcher writes for samples, state and resume exist in this sd-scripts' parser
import inspect
import train_network
parsed = vars(sdxl_train_network.setup_parser().parse_args([
    "--sample_prompts", "p.txt", "--sample_every_n_steps", "5", "--sample_sampler", "euler_a", "--save_state",
    "--save_state_on_train_end", "--resume", "s", "--skip_until_initial_step"]))
options = {k: parsed.get(k) for k in ("sample_prompts", "sample_every_n_steps", "sample_sampler", "save_state",
                                      "save_state_on_train_end", "resume", "skip_until_initial_step")}
# the order resume depends on: network created and applied, optimizer built, prepared, then the state loaded
src = inspect.getsource(train_network.NetworkTrainer.train)
marks = ["network_module.create_network(", "network.apply_to(", "train_util.get_optimizer(",
         "accelerator.prepare(", "resume_from_local_or_hf_if_specified("]
order = [src.find(m) for m in marks]
# gradients of the network are averaged across processes the way the multi-process design relies on
reduce_mean = 'reduce(param.grad, reduction="mean")' in inspect.getsource(train_network.NetworkTrainer.all_reduce_network)
print("RESULT " + json.dumps({
    "only_ours": sorted(our_names - their_names)[:5], "only_theirs": sorted(their_names - our_names)[:5],
    "n_ours": len(our_names), "n_theirs": len(their_names),
    "ranks_match": loaded == {k: m.rank for k, m in modules.items()}, "n_loaded": len(loaded),
    "missing": [k for k in info.missing_keys if "lora" in k][:3], "unexpected": list(info.unexpected_keys)[:3],
    "process_batch": callable(getattr(trainer, "process_batch", None)),
    "options": options, "order": order, "reduce_mean": reduce_mean,
}))
"""


def test_sd_scripts_checkout_names_and_loader(tmp_path):
    folder = check_sd_scripts(SD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(folder)]))
    out = subprocess.run([PY, "-c", SCRIPT, str(folder), str(tmp_path / "ragged.safetensors")], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(r)
    # sd-scripts' networks.lora also wraps a few modules that are no LoRA² target (e.g. time embeddings in
    # resnets); every LoRA² name must be one of sd-scripts' names
    assert r["only_ours"] == [], r
    assert r["ranks_match"] and r["n_loaded"] > 100 and r["missing"] == [] and r["unexpected"] == [], r
    assert r["process_batch"]
    assert r["options"] == {"sample_prompts": "p.txt", "sample_every_n_steps": 5, "sample_sampler": "euler_a",
                            "save_state": True, "save_state_on_train_end": True, "resume": "s",
                            "skip_until_initial_step": True}, r["options"]
    assert -1 not in r["order"] and r["order"] == sorted(r["order"]), r["order"]
    assert r["reduce_mean"]
