"""Stand-in for sd-scripts' train_network.py (see docs/sd_scripts.md): the calls, in sd-scripts' order, that a
network module and a trainer subclass see.  Not a copy of sd-scripts; only its contract."""
import importlib
import json
import os
import random
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lora2_train.models import SDXLUNet, reduced, sdxl_config


def batch_for(rank, step, unet):
    """This process's batch at `step` (create_network_from_weights is not used here)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    c = unet.config
    return (torch.randn(1, c.in_channels, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
            torch.randn(1, 8, c.context_dim, generator=g), torch.randn(1, c.adm_in_channels, generator=g))


class NetworkTrainer:
    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True):
        x, t, ctx, y = batch
        target = torch.sin(3 * x)
        return (unet(x, t, ctx, y) - target).square().mean()

    def all_reduce_network(self, accelerator, network):
        for param in network.parameters():
            if param.grad is not None:
                param.grad = accelerator.reduce(param.grad, reduction="mean")

    @staticmethod
    def write_samples(args, step):
        """One PNG per prompt line where sd-scripts writes them: <output_dir>/sample/<name>_<step>_<i>_<time>.png,
        sized by the line's --w/--h (default 64), grey level from the step."""
        from PIL import Image

        folder = os.path.join(args.output_dir, "sample")
        os.makedirs(folder, exist_ok=True)
        with open(args.sample_prompts, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        for i, line in enumerate(lines):
            words = line.split()
            size = [int(words[words.index(k) + 1]) if k in words else 64 for k in ("--w", "--h")]
            name = f"{args.output_name}_{step:06d}_{i:02d}_{time.strftime('%Y%m%d%H%M%S')}.png"
            Image.new("RGB", tuple(size), (10 * step, 0, 0)).save(os.path.join(folder, name))

    def train(self, args):
        if args.seed is None:  # as sd-scripts: without --seed every process draws its own
            args.seed = random.randint(0, 2 ** 32)
        set_seed(args.seed)
        self.assert_extra_args(args, None, None)
        accelerator = Accelerator()
        rank = accelerator.process_index
        torch.manual_seed(1234)
        unet = SDXLUNet(reduced(sdxl_config(), depth=(0, 1, 1), middle=1)).requires_grad_(False)
        set_seed(args.seed)
        module = importlib.import_module(args.network_module)
        kwargs = dict(a.split("=", 1) for a in (args.network_args or []))
        network = module.create_network(1.0, args.network_dim, args.network_alpha, None, None, unet,
                                        neuron_dropout=None, **kwargs)
        network.apply_to(None, unet, False, True)
        groups, _ = network.prepare_optimizer_params_with_multiple_te_lrs(None, args.unet_lr, args.learning_rate)
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.01 * s))
        network, optimizer, lr_scheduler = accelerator.prepare(network, optimizer, lr_scheduler)
        accelerator.unwrap_model(network).prepare_grad_etc(None, unet)
        current = {"step": 0, "from_state": None}

        def save_hook(models, weights, output_dir):
            kind = type(accelerator.unwrap_model(network))
            if accelerator.is_main_process:
                for i in reversed([i for i, m in enumerate(models) if not isinstance(m, kind)]):
                    weights.pop(i)
            with open(os.path.join(output_dir, "train_state.json"), "w") as f:
                json.dump({"current_epoch": 1, "current_step": current["step"] + 1}, f)

        def load_hook(models, input_dir):
            kind = type(accelerator.unwrap_model(network))
            for i in reversed([i for i, m in enumerate(models) if not isinstance(m, kind)]):
                models.pop(i)
            with open(os.path.join(input_dir, "train_state.json")) as f:
                current["from_state"] = json.load(f)["current_step"]

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
        if getattr(args, "resume", None):
            accelerator.load_state(args.resume)
        global_step = (current["from_state"] or 0) if getattr(args, "skip_until_initial_step", False) else 0
        diverge_at = int(os.environ.get("FAKE_SD_DIVERGE_AT", "0"))
        pause = float(os.environ.get("FAKE_SD_STEP_SLEEP", "0"))
        net = accelerator.unwrap_model(network)
        first_loss = None
        while global_step < args.max_train_steps:
            current["step"] = global_step
            batch = batch_for(rank, global_step, unet)
            with accelerator.accumulate(network):
                loss = self.process_batch(batch, [], unet, network, None, None, None, None, accelerator, args,
                                          None, None, is_train=True)
                accelerator.backward(loss)
                first_loss = float(loss.detach()) if first_loss is None else first_loss
                if accelerator.sync_gradients:
                    self.all_reduce_network(accelerator, network)
                    accelerator.clip_grad_norm_(net.get_trainable_params(), 1.0)
                if rank == 1 and global_step + 1 == diverge_at:
                    with torch.no_grad():
                        next(iter(net.layers.values())).rho.add_(0.5)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            time.sleep(pause)
            if getattr(args, "sample_prompts", None) and getattr(args, "sample_every_n_steps", None) \
                    and global_step % args.sample_every_n_steps == 0 and accelerator.is_main_process:
                self.write_samples(args, global_step)
            every = getattr(args, "save_every_n_steps", None)
            if every and global_step % every == 0 and global_step < args.max_train_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    net.save_weights(os.path.join(args.output_dir, f"{args.output_name}-step{global_step:08d}"
                                                  ".safetensors"), torch.float32, {})
        accelerator.wait_for_everyone()
        report = os.environ.get("FAKE_SD_REPORT_DIR")
        if report:
            weights = [p.detach().double() for p in net.weight_parameters()]
            with open(os.path.join(report, f"rank{rank}.json"), "w") as f:
                json.dump({"ranks": net.ranks(), "steps": net.steps, "nus": net.nus(), "first_loss": first_loss,
                           "seed": args.seed, "network_seed": net.config.seed,
                           "prepared_as": type(network).__name__, "processes": accelerator.num_processes,
                           "weights": [float(w.sum()) for w in weights],
                           "weight_norms": [float(w.norm()) for w in weights]}, f)
        if accelerator.is_main_process and (getattr(args, "save_state", False)
                                            or getattr(args, "save_state_on_train_end", False)):
            accelerator.save_state(os.path.join(args.output_dir, f"{args.output_name}-state"))
        if accelerator.is_main_process:
            net.save_weights(os.path.join(args.output_dir, f"{args.output_name}.safetensors"), torch.float32, {})
        accelerator.end_training()
