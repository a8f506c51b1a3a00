"""The sd-scripts launcher: checkout checks, config files, progress parsing, subprocess streaming and cancel.

The subprocess tests run the launcher against a stand-in interpreter (a small script given as `python`) that
prints the trainer extension's line protocol, so the launcher's side of the contract is tested without
sd-scripts; tests/test_kohya_sd_scripts.py runs the real thing when SD_SCRIPTS_DIR is set.
"""
import json
import stat
import sys
import tomllib
from pathlib import Path

import pytest

from lora2_train import cli
from lora2_train.config import LoRA2Config
from lora2_train.kohya import launch
from lora2_train.kohya.tokenizers import make_tokenizer_cache


def fake_checkout(root: Path, process_batch=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "library").mkdir(exist_ok=True)
    (root / "library" / "train_util.py").write_text("")
    hooks = "def process_batch(self):\n    pass\n" if process_batch else ""
    (root / "train_network.py").write_text(
        f"class NetworkTrainer:\n    {hooks}    def assert_extra_args(self): pass\n# create_network_from_weights\n")
    (root / "sdxl_train_network.py").write_text("class SdxlNetworkTrainer: pass\n")
    return root


def fake_python(tmp_path: Path, body: str) -> str:
    """An executable standing in for the sd-scripts Python: answers the requirements probe, then runs `body`."""
    script = tmp_path / "fakepython"
    script.write_text(f"""#!{sys.executable}
import json, os, sys, time, signal
if sys.argv[1] == "-c":
    print("[]")
    sys.exit(0)
args = sys.argv[1:]
cfg = args[args.index("--config_file") + 1]
{body}
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def dataset(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.png").write_bytes(b"\x89PNG")
    (d / "a.txt").write_text("a photo")
    return d


def test_check_sd_scripts_errors(tmp_path):
    with pytest.raises(launch.SdScriptsError, match="no such folder"):
        launch.check_sd_scripts(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(launch.SdScriptsError, match=r"not an sd-scripts checkout \(train_network.py is missing\)"):
        launch.check_sd_scripts(tmp_path / "empty")
    old = fake_checkout(tmp_path / "old", process_batch=False)
    with pytest.raises(launch.SdScriptsError, match="lacks 'process_batch'"):
        launch.check_sd_scripts(old)
    assert launch.check_sd_scripts(fake_checkout(tmp_path / "ok")) == (tmp_path / "ok").resolve()


def test_requirements_probe_names_missing_modules(tmp_path):
    # this interpreter has no 'voluptuous'/'cv2' unless installed; check the message shape with a fake probe
    probe = tmp_path / "py"
    probe.write_text(f"#!{sys.executable}\nprint('[\"accelerate\", \"cv2\"]')\n")
    probe.chmod(0o755)
    with pytest.raises(launch.SdScriptsError, match=r"lacks sd-scripts requirements \(accelerate, opencv-python\).*"
                                                   r"pip install -r .*requirements.txt"):
        launch.check_requirements(str(probe), tmp_path)
    with pytest.raises(launch.SdScriptsError, match="no such Python interpreter"):
        launch.check_requirements(str(tmp_path / "nope"), tmp_path)


def test_config_files_are_valid_toml(tmp_path):
    cfg = LoRA2Config(r_init=16, r_target=8, r_max=64, q=0.8, lambda_e=0.1, targets="attn+ff", lr=2e-4)
    text = launch.to_toml(launch.training_settings(tmp_path / "sdxl.safetensors", tmp_path / "d.toml", tmp_path,
                                                   "mine", cfg, steps=30, seed=3, save_every=10,
                                                   extra={"min_snr_gamma": 5.0}))
    s = tomllib.loads(text)
    assert s["network_module"] == "lora2_train.kohya.network" and s["network_dim"] == 16
    args = dict(a.split("=", 1) for a in s["network_args"])
    assert args["r_target"] == "8" and args["q"] == "0.8" and args["targets"] == "attn1,attn2,ff"
    assert s["network_train_unet_only"] is True and s["cache_text_encoder_outputs"] is True
    assert s["max_train_steps"] == 30 and s["save_every_n_steps"] == 10 and s["min_snr_gamma"] == 5.0
    assert "tokenizer_cache_dir" not in s and "text_encoder_lr" not in s
    for te_lr, expected in ((5e-5, 5e-5), (0.0, 2e-4)):  # text-encoder LoRAs: their own rate, 0 = the U-Net's
        te_cfg = LoRA2Config(targets=("attn1", "te_attn"), lr=2e-4, text_encoder_lr=te_lr)
        te_s = launch.training_settings(tmp_path / "sdxl.safetensors", tmp_path / "d.toml", tmp_path, "mine",
                                        te_cfg, steps=30, seed=3)
        assert te_s["text_encoder_lr"] == expected and te_s["network_train_unet_only"] is False
    d = tomllib.loads(launch.dataset_toml(Path('C:\\odd "dir"'), 512, 2, "mine"))
    assert d["datasets"][0]["resolution"] == [512, 512]
    assert d["datasets"][0]["subsets"][0]["image_dir"] == 'C:\\odd "dir"'
    # the LoRA² network module reads the network_args back to the same config
    from lora2_train.kohya.network import make_config
    back = make_config(s["network_dim"], args)
    assert (back.r_init, back.r_target, back.r_max, back.q, back.lambda_e, back.targets) == \
        (16, 8, 64, 0.8, 0.1, ("attn1", "attn2", "ff"))


@pytest.mark.parametrize("name, sd_name", [("adam", "torch.optim.Adam"), ("adamw", "AdamW"), ("adamw8bit", "AdamW8bit"),
                                           ("adafactor", "Adafactor"), ("prodigy", "Prodigy"), ("lion", "Lion")])
def test_optimizer_settings_are_ones_the_network_accepts(tmp_path, name, sd_name):
    from argparse import Namespace

    from lora2_train.optim import check_sd_scripts_optimizer, sd_scripts_optimizer_type

    cfg = LoRA2Config(optimizer=name, mixed_precision="bf16")
    s = launch.training_settings(tmp_path / "m.safetensors", tmp_path / "d.toml", tmp_path, "n", cfg, 10, 0)
    assert s["optimizer_type"] == sd_name and s["mixed_precision"] == "bf16"
    assert check_sd_scripts_optimizer(sd_scripts_optimizer_type(Namespace(optimizer_type=sd_name)))
    if name == "adafactor":  # a fixed learning rate, as in the embedded trainer
        assert {"relative_step=False", "scale_parameter=False", "warmup_init=False"} <= set(s["optimizer_args"])


def test_precision_options_that_do_not_go_together_are_refused(tmp_path):
    cfg = LoRA2Config(mixed_precision="no")
    settings = (tmp_path / "m.safetensors", tmp_path / "d.toml", tmp_path, "n", cfg, 10, 0)
    with pytest.raises(ValueError, match="^fp8_base needs mixed_precision 'bf16' or 'fp16', got 'no'$"):
        launch.training_settings(*settings, extra=launch.precision_options(fp8_base=True))
    with pytest.raises(ValueError, match="^full_bf16 needs mixed_precision 'bf16'"):
        launch.training_settings(*settings, extra={"mixed_precision": "fp16", "full_bf16": True})
    s = launch.training_settings(*settings, extra={"mixed_precision": "bf16", **launch.precision_options(True, True)})
    assert s["fp8_base"] is True and s["full_bf16"] is True


def test_parse_progress_lines():
    line = 'noise LORA2_PROGRESS {"step":3,"total":9,"loss":0.5,"mse":0.4,"reg":0.1,"entropy":0.0,' \
           '"num_params":100,"resized":{"k":[8,4]},"elapsed":1.5,"ranks":{"k":4}}\n'
    e = launch.parse_progress_line(line)
    assert (e.step, e.total, e.loss, e.mse, e.reg, e.num_params, e.elapsed) == (3, 9, 0.5, 0.4, 0.1, 100, 1.5)
    assert e.ranks == {"k": 4} and e.resized == {"k": (8, 4)}
    e2 = launch.parse_progress_line(line.replace(',"ranks":{"k":4}', ""), ranks={"k": 4})
    assert e2.ranks == {"k": 4}
    assert launch.parse_progress_line("steps: 10%|#   | 1/9") is None
    assert launch.parse_progress_line("LORA2_PROGRESS {broken") is None
    assert launch.parse_saved_line('LORA2_SAVED {"path":"/x.safetensors","step":2,"ranks":{}}')["step"] == 2


PROTOCOL = """
out = os.path.dirname(cfg)
import tomllib
s = tomllib.load(open(cfg, "rb"))
target = os.path.join(s["output_dir"], s["output_name"] + ".safetensors")
for step in range(1, s["max_train_steps"] + 1):
    ev = {"step": step, "total": s["max_train_steps"], "loss": 1.0 / step, "mse": 0.5, "reg": 0.1,
          "entropy": 0.0, "num_params": 10 * step, "resized": {}, "elapsed": step * 0.1}
    if step == 1:
        ev["ranks"] = {"lora_unet_a": 8}
    print("steps: some tqdm noise", flush=True)
    print("LORA2_PROGRESS " + json.dumps(ev), flush=True)
open(target, "wb").write(b"adapter")
print("LORA2_SAVED " + json.dumps({"path": target, "step": step, "ranks": {"lora_unet_a": 8}}), flush=True)
"""


def run_args(tmp_path, checkout, data, **kw):
    ckpt = tmp_path / "sdxl.safetensors"
    ckpt.write_bytes(b"x")
    base = dict(sd_scripts_dir=checkout, base_checkpoint=ckpt, dataset_dir=data, output_dir=tmp_path / "out",
                output_name="mine", config=LoRA2Config(r_init=8), steps=4, resolution=256, batch_size=1, seed=0)
    base.update(kw)
    return base


def test_train_sd_scripts_streams_progress_and_returns_the_adapter(tmp_path):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    events = []
    path = launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, PROTOCOL),
                                              callback=events.append))
    assert path == (tmp_path / "out" / "mine.safetensors").resolve() and path.read_bytes() == b"adapter"
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert all(e.ranks == {"lora_unet_a": 8} for e in events)
    assert events[-1].loss == 0.25
    work = tmp_path / "out" / ".lora2-mine"
    assert "LORA2_PROGRESS" in (work / "train.log").read_text()
    assert tomllib.loads((work / "dataset.toml").read_text())["datasets"][0]["subsets"][0]["image_dir"] == str(data)
    # the adapter exists now: a second run refuses to replace it
    with pytest.raises(FileExistsError, match="already exists"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, PROTOCOL)))


def test_failure_is_one_line_naming_the_cause(tmp_path):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    body = ("print('loading...', flush=True)\n"
            "print('lora2_train.kohya.train: error: network_args: unknown key \\'rank\\'', file=sys.stderr)\n"
            "sys.exit(2)\n")
    with pytest.raises(launch.SdScriptsError, match=r"failed \(exit 2\): network_args: unknown key 'rank'"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, body)))
    body = "raise AssertionError('resolution must be divisible by 32')\n"
    with pytest.raises(launch.SdScriptsError, match="AssertionError: resolution must be divisible by 32"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, body)))
    # killed from outside (the out-of-memory killer sends SIGKILL): the reason, not the last log line
    body = ("print('text encoder 1: <All keys matched successfully>', flush=True)\n"
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    with pytest.raises(launch.SdScriptsError, match=r"failed \(exit -9\): killed \(SIGKILL; .*out-of-memory"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, body)))


def test_should_stop_terminates_and_keeps_the_last_save(tmp_path):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    body = """
s_out = os.path.join(os.path.dirname(os.path.dirname(cfg)), "mine-step00000002.safetensors")
def on_term(*_):
    open(s_out, "wb").write(b"partial")
    print("LORA2_SAVED " + json.dumps({"path": s_out, "step": 2, "ranks": {}}), flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
for step in (1, 2):
    print("LORA2_PROGRESS " + json.dumps({"step": step, "total": 99, "loss": 1, "mse": 1, "reg": 0, "entropy": 0,
          "num_params": 1, "resized": {}, "elapsed": 0, "ranks": {"a": 4}}), flush=True)
while True:
    time.sleep(0.05)
"""
    events = []
    with pytest.raises(launch.TrainingCancelled, match="last saved: .*mine-step00000002") as info:
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, body),
                                           callback=events.append, should_stop=lambda: len(events) >= 2,
                                           poll_seconds=0.05))
    assert info.value.path.read_bytes() == b"partial"


def test_bad_inputs(tmp_path):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, base_checkpoint=tmp_path / "none.safetensors"))
    (tmp_path / "noimg").mkdir()
    with pytest.raises(ValueError, match="no images"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, tmp_path / "noimg"))
    with pytest.raises(ValueError, match="multiple of 64"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, resolution=300))
    with pytest.raises(ValueError, match="must stay inside"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, output_name="../escape"))


def test_cli_train_command(tmp_path, capsys):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    ckpt = tmp_path / "sdxl.safetensors"
    ckpt.write_bytes(b"x")
    common = ["train", "--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(tmp_path / "o"),
              "--name", "cli", "--steps", "3", "--resolution", "256"]
    rc = cli.main(common + ["--sd-scripts", str(checkout), "--sd-scripts-python", fake_python(tmp_path, PROTOCOL),
                            "--r-init", "8", "--targets", "attn+ff", "--sd-option", "min_snr_gamma=5",
                            "--optimizer", "adamw8bit", "--full-bf16", "--max-params", "500000"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].endswith("cli.safetensors")
    s = tomllib.loads((tmp_path / "o" / ".lora2-cli" / "train.toml").read_text())
    assert s["min_snr_gamma"] == 5 and "targets=attn1,attn2,ff" in s["network_args"]
    assert s["optimizer_type"] == "AdamW8bit" and s["mixed_precision"] == "bf16" and s["full_bf16"] is True
    assert "max_params=500000" in s["network_args"] and "fp8_base" not in s
    # a GPU memory preset fills what is not given explicitly
    common_p = [a for a in common if a not in ("--resolution", "256")] + ["--name", "cli8", "--sd-scripts", str(checkout),
                                                                          "--sd-scripts-python", fake_python(tmp_path, PROTOCOL)]
    assert cli.main(common_p + ["--preset", "8GB", "--batch-size", "2"]) == 0
    s = tomllib.loads((tmp_path / "o" / ".lora2-cli8" / "train.toml").read_text())
    d = tomllib.loads((tmp_path / "o" / ".lora2-cli8" / "dataset.toml").read_text())
    assert d["datasets"][0]["resolution"] == [768, 768] and d["datasets"][0]["batch_size"] == 2
    assert s["optimizer_type"] == "AdamW8bit" and s["fp8_base"] is True and s["full_bf16"] is True
    assert s["gradient_checkpointing"] is True and "max_params=20000000" in s["network_args"]
    assert s["cache_latents_to_disk"] is True and s["cache_text_encoder_outputs_to_disk"] is True
    capsys.readouterr()
    rc = cli.main(common + ["--sd-scripts", str(checkout), "--mixed-precision", "fp16", "--full-bf16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["lora2_train train: error: full_bf16 needs mixed_precision 'bf16', got 'fp16'"], err
    rc = cli.main(common + ["--sd-scripts", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "not an sd-scripts checkout" in err[0]
    rc = cli.main(common + ["--backend", "embedded"])
    assert rc == 1 and "ComfyUI" in capsys.readouterr().err


def test_tokenizer_cache_loads_with_transformers(tmp_path):
    from transformers import CLIPTokenizer

    src = tmp_path / "vocab"
    src.mkdir()
    words = ["!", "a", "b", "c", "a</w>", "b</w>", "c</w>", "ab</w>"]
    vocab = {w: i for i, w in enumerate(words + ["<|startoftext|>", "<|endoftext|>"])}
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    made = make_tokenizer_cache(src, tmp_path / "cache")
    assert [p.name for p in made] == ["openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"]
    tok = CLIPTokenizer.from_pretrained(str(made[0]))
    ids = tok("c ab A")["input_ids"]
    assert ids == [vocab[t] for t in ("<|startoftext|>", "c</w>", "ab</w>", "a</w>", "<|endoftext|>")]
    assert CLIPTokenizer.from_pretrained(str(made[1])).pad_token == "!"
    with pytest.raises(FileExistsError, match="already exists"):
        make_tokenizer_cache(src, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no vocab.json"):
        make_tokenizer_cache(tmp_path, tmp_path / "c2")


def test_launch_commands_for_one_and_several_processes(tmp_path):
    cfg = tmp_path / "train.toml"
    one = launch.launch_command("py", tmp_path, cfg)
    assert one == ["py", "-m", "lora2_train.kohya.train", "--sd_scripts", str(tmp_path), "--config_file", str(cfg)]
    gpus = launch.launch_command("py", tmp_path, cfg, num_processes=4, mixed_precision="bf16")
    assert gpus[:3] == ["py", "-m", "accelerate.commands.launch"] and gpus[-6:] == one[1:]
    opts = gpus[3:-6]
    assert "--multi_gpu" in opts and opts[opts.index("--num_processes") + 1] == "4"
    assert opts[opts.index("--num_machines") + 1] == "1" and opts[opts.index("--mixed_precision") + 1] == "bf16"
    assert opts[opts.index("--main_process_port") + 1] == "0"  # a free port: several runs may share a machine
    # the accelerate launch parser accepts exactly these options and takes the module and its arguments
    from accelerate.commands.launch import launch_command_parser
    parsed = launch_command_parser().parse_args(gpus[3:])
    assert parsed.multi_gpu and parsed.num_processes == 4 and parsed.module
    assert parsed.training_script == "lora2_train.kohya.train" and parsed.training_script_args == one[3:]
    cpu = launch.launch_command("py", tmp_path, cfg, num_processes=2, cpu=True)
    assert cpu[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]


def test_samples_resume_and_state_options(tmp_path):
    cfg = LoRA2Config(r_init=8)
    base = (tmp_path / "c.safetensors", tmp_path / "d.toml", tmp_path, "mine", cfg, 30, 3)
    plain = launch.training_settings(*base)
    for key in ("sample_prompts", "sample_every_n_steps", "save_state", "save_state_on_train_end", "resume",
                "skip_until_initial_step"):
        assert key not in tomllib.loads(launch.to_toml(plain)), key
    prompts = launch.write_sample_prompts(tmp_path / "p.txt", "a dog --w 512 --h 512\n\n# note\n  a cat  \n")
    assert prompts.read_text() == "a dog --w 512 --h 512\na cat\n"
    s = tomllib.loads(launch.to_toml(launch.training_settings(
        *base, save_every=10, sample_prompts_file=prompts, sample_every=5, sample_sampler="k_euler",
        resume_from=tmp_path / "mine-step00000010-state", save_state=True)))
    assert (s["sample_prompts"], s["sample_every_n_steps"], s["sample_sampler"]) == (str(prompts), 5, "k_euler")
    assert s["save_state_on_train_end"] is True and s["save_state"] is True  # states at every save_every too
    assert s["resume"] == str(tmp_path / "mine-step00000010-state") and s["skip_until_initial_step"] is True
    with pytest.raises(ValueError, match="sample_prompts: no prompt"):
        launch.sample_prompt_lines("\n# only a comment\n")


def test_state_folder_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume_from: .*no such state folder"):
        launch.check_state_dir(tmp_path / "none")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an sd-scripts training state"):
        launch.check_state_dir(tmp_path / "half")
    (tmp_path / "half" / "optimizer.bin").write_bytes(b"x")
    assert launch.check_state_dir(tmp_path / "half") == (tmp_path / "half").resolve()


def test_sample_images_of_a_run_in_step_and_prompt_order(tmp_path):
    import os
    import time

    d = tmp_path / "sample"
    d.mkdir()
    names = ["mine_000010_01_20250101000000_3.png", "mine_000010_00_20250101000000_3.png",
             "mine_000002_00_20250101000000.png", "mine_e000001_00_20250101000000.png", "other_000001_00_1.png",
             "mine_notes.png"]
    for n in names:
        (d / n).write_bytes(b"png")
    old = d / "mine_000001_00_20240101000000.png"
    old.write_bytes(b"png")
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # an earlier run's sample
    found = [p.name for p in launch.sample_images(tmp_path, "mine", since=time.time() - 60)]
    assert found == ["mine_000002_00_20250101000000.png", "mine_000010_00_20250101000000_3.png",
                     "mine_000010_01_20250101000000_3.png", "mine_e000001_00_20250101000000.png"]
    assert launch.sample_images(tmp_path / "nothing", "mine") == []


def test_several_processes_need_as_many_cuda_devices(tmp_path, monkeypatch):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    monkeypatch.setattr(launch, "cuda_device_count", lambda python, folder: 1)
    with pytest.raises(launch.SdScriptsError, match="num_processes=2 needs 2 CUDA devices; .* sees 1"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, python=fake_python(tmp_path, PROTOCOL),
                                           num_processes=2))
    with pytest.raises(ValueError, match="num_processes must be a positive integer"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, num_processes=0))
    with pytest.raises(ValueError, match="sample_sampler must be one of"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, sample_sampler="nope"))
    with pytest.raises(ValueError, match="sample_prompts: no prompt"):
        launch.train_sd_scripts(**run_args(tmp_path, checkout, data, sample_prompts="", sample_every=5))
    assert launch.cuda_device_count(sys.executable, tmp_path) >= 0


def test_cli_train_passes_processes_samples_and_resume(tmp_path, capsys):
    checkout, data = fake_checkout(tmp_path / "sd"), dataset(tmp_path)
    ckpt = tmp_path / "sdxl.safetensors"
    ckpt.write_bytes(b"x")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog --w 512 --h 512\n")
    state = tmp_path / "cut-step00000002-state"
    state.mkdir()
    (state / "optimizer.bin").write_bytes(b"x")
    (state / "model.safetensors").write_bytes(b"x")
    rc = cli.main(["train", "--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(tmp_path / "o"),
                   "--name", "cli", "--steps", "3", "--resolution", "256", "--sd-scripts", str(checkout),
                   "--sd-scripts-python", fake_python(tmp_path, PROTOCOL), "--sample-prompts", str(prompts),
                   "--sample-every", "2", "--sample-sampler", "ddim", "--resume", str(state), "--save-state"])
    assert rc == 0, capsys.readouterr().err
    s = tomllib.loads((tmp_path / "o" / ".lora2-cli" / "train.toml").read_text())
    assert s["sample_every_n_steps"] == 2 and s["sample_sampler"] == "ddim" and s["resume"] == str(state.resolve())
    assert (tmp_path / "o" / ".lora2-cli" / "sample_prompts.txt").read_text() == "a sks dog --w 512 --h 512\n"
    assert s["save_state_on_train_end"] is True
    rc = cli.main(["train", "--checkpoint", str(ckpt), "--dataset", str(data), "--out", str(tmp_path / "o"),
                   "--name", "cli2", "--sd-scripts", str(checkout), "--sample-prompts", str(prompts)])
    assert rc == 1 and "--sample-prompts needs --sample-every" in capsys.readouterr().err
