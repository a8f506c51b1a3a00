"""Stand-in for sd-scripts' sdxl_train_network.py."""
import argparse

import train_network


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    pass


def setup_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--config_file", default=None)
    p.add_argument("--network_module", default=None)
    defaults = dict(optimizer_type=None, use_8bit_adam=False, gradient_checkpointing=False, network_args=None,
                    network_dim=None, network_alpha=1.0, save_precision=None, output_name=None, output_dir=".",
                    save_state=False, save_state_on_train_end=False, resume=None, skip_until_initial_step=False,
                    save_every_n_steps=None, max_train_steps=10, learning_rate=1e-4, unet_lr=None, seed=None,
                    sample_prompts=None, sample_every_n_steps=None, sample_sampler="ddim")
    p.set_defaults(**defaults)
    return p
