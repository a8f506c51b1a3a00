"""lora2_train.distributed: the re-allocation check across processes (two forked CPU processes over gloo)."""
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests_helpers import unet_inputs
from lora2_train import distributed as D
from lora2_train.kohya import network as kn
from lora2_train.models import SDXLUNet, reduced, sdxl_config

DEADLINE_S = 60


def run_forked(fn, tmp_path, nprocs=2, *args):
    """Run fn(rank, size, store_file, out_dir, *args) in `nprocs` forked processes; results from
    out_dir/rank<i>.json; a process still running after DEADLINE_S is killed and the test fails."""
    ctx = mp.start_processes(fn, args=(nprocs, str(tmp_path / "store"), str(tmp_path), *args), nprocs=nprocs,
                             start_method="fork", join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {DEADLINE_S} s (a hang)")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nprocs)]


def _init(rank, size, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)


def _kohya_worker(rank, size, store, out, unet, diverge_at):
    """sd-scripts' arrangement in miniature: own data per process, gradients averaged (all-reduce,
    mean) before each optimizer step; re-allocation every 2 steps from the optimizer's post-step hook."""
    _init(rank, size, store)
    torch.manual_seed(3)  # sd-scripts seeds every process alike before it builds the network
    net = kn.create_network(1.0, 8, 1, None, None, unet, r_max="16", r_target="8", lambda_r="0", nu_lr="3.0",
                            resize_every="2", rank_block="1")
    result = {}
    try:
        net.apply_to(None, unet, False, True)
        groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, 0.05, 0.05)
        opt = torch.optim.AdamW(groups, lr=0.05)
        for step in range(1, 7):
            x, t, ctx, y = unet_inputs(unet, batch=1, seed=100 * rank + step)
            (unet(x, t, ctx, y) - torch.sin(3 * x)).square().mean().backward()
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= size
            if rank == 1 and step == diverge_at:
                with torch.no_grad():
                    next(iter(net.layers.values())).rho.add_(0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        result = {"ranks": net.ranks(), "weights": [float(p.double().sum()) for p in net.weight_parameters()],
                  "resized_any": len(set(net.ranks().values())) > 1}
    except D.ProcessesDiverged as e:
        result = {"error": str(e)}
    finally:
        net.close()
        (out and open(f"{out}/rank{rank}.json", "w").write(json.dumps(result)))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return SDXLUNet(reduced(sdxl_config(), depth=(0, 1, 1), middle=1)).requires_grad_(False)


def test_single_process_is_a_no_op():
    assert D.world() == (0, 1) and D.is_main_process()
    assert D.any_true(True) and not D.any_true(False) and D.all_true(True)


def test_a_diverged_process_stops_every_process_with_one_line(tmp_path, unet):
    """Process 1 moves one ρ before optimizer step 3: caught at the re-allocation after step 4 (ν's
    checksum), on both processes, before any shape differs."""
    r0, r1 = run_forked(_kohya_worker, tmp_path, 2, unet, 3)
    assert r0["error"] == r1["error"]
    msg = r0["error"]
    assert len(msg.splitlines()) == 1
    assert msg.startswith("LoRA² re-allocation at step 4: the 2 processes disagree: ")
    assert "the ν checksums differ" in msg and "not averaged across processes" in msg
