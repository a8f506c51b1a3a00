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
from lora2_train.models import SDXLUNet, reduced

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


def _kohya_worker(rank, size, store, out, unet, diverge_at, what="rho"):
    """sd-scripts' arrangement in miniature: own data per process, gradients averaged (all-reduce,
    mean) before each optimizer step; re-allocation every 2 steps from the optimizer's post-step hook.
    Process 1 changes one ρ (`what` = "rho") or its row seed ("seed") before optimizer step `diverge_at`."""
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
            if rank == 1 and step == diverge_at and what == "seed":
                net.set_seed(net.config.seed + 1)
            elif rank == 1 and step == diverge_at:
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
    from lora2_train.models import koala_700m_config

    torch.manual_seed(0)
    return SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8)).requires_grad_(False)


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


def test_processes_with_different_row_seeds_stop_before_drawing_rows(tmp_path, unet):
    """Process 1 takes another row seed after the first step (where the processes agree on one): caught at the
    first re-allocation (step 2), before any row is drawn from it, with the seeds named."""
    r0, r1 = run_forked(_kohya_worker, tmp_path, 2, unet, 2, "seed")
    assert r0["error"] == r1["error"]
    msg = r0["error"]
    assert msg.startswith("LoRA² re-allocation at step 2: the 2 processes disagree: the row seeds of A of 168 "
                          "components differ (first: lora_unet_")
    assert "checksums" not in msg and msg.endswith("; each process's network was built with its own seed")


def _trainer_setup(steps):
    from lora2_train.config import LoRA2Config
    from lora2_train.models import koala_700m_config
    from lora2_train.network import LoRA2Network

    torch.manual_seed(0)
    unet = SDXLUNet(reduced(koala_700m_config(), model_channels=16, context_dim=32, head_channels=8))
    cfg = LoRA2Config(r_init=4, r_target=4, r_max=16, lr=1e-2, nu_lr=0.5, lambda_r=0.0, steps=steps, resize_every=2,
                      checkpoint_every=100, batch_size=1, seed=5)
    g = torch.Generator().manual_seed(1)
    data = [{"latents": torch.randn(4, 8, 8, generator=g),
             "cond": {"context": torch.randn(6, 32, generator=g), "y": torch.randn(64, generator=g)}} for _ in range(6)]
    return unet.requires_grad_(False), LoRA2Network(cfg, unet).apply_to(), data, cfg


def _snapshot(net):
    return {"ranks": net.ranks(), "weights": [float(p.detach().double().sum()) for p in net.parameters()]}


def _trainer_worker(rank, size, store, out):
    """The embedded trainer on two processes: uninterrupted 8 steps; then 8 steps stopped after step 4 by a
    request on process 1 only and resumed from process 0's checkpoint."""
    import os

    from lora2_train.trainer import Trainer

    torch.set_num_threads(1)
    # what torchrun --nproc_per_node 2 sets for each process; init_from_env joins that group (gloo on the CPU)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=open(store + ".port").read())
    assert D.init_from_env() == (rank, size) and dist.get_backend() == "gloo"
    result = {}
    try:
        unet, net, data, cfg = _trainer_setup(8)
        events = []
        full = Trainer(unet, net, data, cfg, out_dir=f"{out}/full", callback=events.append).train()
        result["full"] = _snapshot(net)
        result["events"] = [e.step for e in events]
        result["resized"] = sorted({(o < n) for e in events for o, n in e.resized.values()})
        net.restore()

        unet, net, data, cfg = _trainer_setup(8)
        t = Trainer(unet, net, data, cfg, out_dir=f"{out}/cut", should_stop=lambda: rank == 1 and t.step >= 4)
        cut = t.train()
        result["cut_steps"], result["cut_stopped"] = cut.steps, cut.stopped
        net.restore()
        unet, net, data, cfg = _trainer_setup(8)
        resumed = Trainer(unet, net, data, cfg, out_dir=f"{out}/cut").train(resume_from=f"{out}/cut/checkpoint.pt")
        result["resumed"] = _snapshot(net)
        result["steps"] = (full.steps, resumed.steps)
    except D.ProcessesDiverged as e:
        result = {"error": str(e)}
    finally:
        (out and open(f"{out}/rank{rank}.json", "w").write(json.dumps(result)))
        dist.destroy_process_group()


def test_embedded_trainer_on_two_processes(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        (tmp_path / "store.port").write_text(str(sock.getsockname()[1]))
    r0, r1 = run_forked(_trainer_worker, tmp_path, 2)
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    assert r0["full"] == r1["full"] and len(set(r0["full"]["ranks"].values())) > 1
    assert r0["resized"] == [False, True]  # components grew and shrank
    assert r0["events"] == list(range(1, 9)) and r1["events"] == []  # progress from process 0 only
    assert (r0["cut_steps"], r0["cut_stopped"]) == (r1["cut_steps"], r1["cut_stopped"]) == (4, True)
    assert r0["resumed"] == r1["resumed"] == r0["full"]  # resumed bit for bit, each process its own data again
    assert r0["steps"] == [8, 8]
    # one checkpoint per run, written by process 0, with both processes' data streams
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert len(state["rng_data_processes"]) == 2
    assert not torch.equal(state["rng_data_processes"][0], state["rng_data_processes"][1])
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint.pt"]
    assert D.init_from_env() == (0, 1)  # outside torchrun: nothing to join


# ---- the row seed of A on several processes (sd-scripts with and without --seed) -------------------------
#: ν moves fast (nu_lr) and both LoRA² terms are on: components grow and shrink at every re-allocation
SEED_NETWORK_ARGS = dict(r_max="16", r_target="8", lambda_r="0.01", beta="0.01", lambda_e="0.01", nu_lr="3.0", resize_every="2",
                         rank_block="1")
SEED_STEPS = 9  # re-allocations after steps 2, 4, 6, 8 (none after the last step)


class _Accelerator:
    """What the trainer extension reads of accelerate's Accelerator."""
    scaler = None

    def __init__(self, rank):
        self.is_main_process = rank == 0

    @staticmethod
    def unwrap_model(m):
        return getattr(m, "module", m)


def _fake_network_trainer():
    """NetworkTrainer of tests/fake_sd_scripts (sd-scripts' process_batch), loaded under its own name."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "fake_sd_scripts" / "train_network.py"
    spec = importlib.util.spec_from_file_location("fake_sd_scripts_train_network", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.NetworkTrainer


def _seed_worker(rank, size, store, out, unet, seed, max_params, late=False):
    """sd-scripts' arrangement: ``set_seed(args.seed)`` on every process (without ``--seed`` each process draws
    its own), the network created, prepared, applied, its optimizer built, the network wrapped in
    DistributedDataParallel; each step the trainer extension's loss on this process's own data and aspect
    bucket (latent size), gradients averaged (mean), the optimizer step, re-allocation from its post-step hook.
    After every re-allocation each process saves its parameters and optimizer state (rank<i>-step<N>.pt).
    `late`: the network is built before the process joins the group (so on its own seed)."""
    from argparse import Namespace

    from torch.nn.parallel import DistributedDataParallel

    from lora2_train.kohya.train import make_trainer_class

    if not late:
        _init(rank, size, store)
    process_seed = seed if seed is not None else [2_718_281_828, 3_141_592_653][rank]
    args = Namespace(seed=process_seed, optimizer_type="AdamW", use_8bit_adam=False, max_train_steps=SEED_STEPS)
    torch.manual_seed(process_seed)
    net = kn.create_network(1.0, 8, 1, None, None, unet, neuron_dropout=None, max_params=str(max_params),
                            **SEED_NETWORK_ARGS)
    if late:
        _init(rank, size, store)
    result = {}
    try:
        net.prepare_network(args)
        net.apply_to(None, unet, False, True)
        groups, _ = net.prepare_optimizer_params_with_multiple_te_lrs(None, 0.05, 0.05)
        opt = torch.optim.AdamW(groups, lr=0.05)
        wrapped = DistributedDataParallel(net)
        names = {id(p): n for n, p in net.named_parameters()}

        def snapshot(step, resized):
            if not resized:
                return
            torch.save({"resized": resized, "ranks": net.ranks(), "seeds": sorted({l.seed for l in net.layers.values()}),
                        "num_params": net.num_parameters(),  # and the components the budget held below D(ν):
                        "cut": sum(l.target_rank() > l.rank for l in net.layers.values()),
                        "params": {n: p.detach().clone() for n, p in net.named_parameters()},
                        "state": {names[id(p)]: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                  for p, s in opt.state.items()}},
                       f"{out}/rank{rank}-step{step}.pt")

        net.step_listeners.append(snapshot)
        trainer = make_trainer_class(_fake_network_trainer())()
        accelerator = _Accelerator(rank)
        for step in range(SEED_STEPS):
            batch = unet_inputs(unet, batch=1, size=8 if rank == 0 else 16, seed=100 * rank + step)
            loss = trainer.process_batch(batch, [], unet, wrapped, None, None, None, None, accelerator, args, None,
                                         None)
            loss.backward()
            for p in net.parameters():  # sd-scripts' all_reduce_network: accelerator.reduce(grad, "mean")
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= size
            opt.step()
            opt.zero_grad(set_to_none=True)
        result = {"seed": net.config.seed, "process_seed": process_seed, "steps": net.steps}
        if rank == 0:
            path = net.save_weights(f"{out}/seed.safetensors", torch.float32, {"ss_seed": process_seed})
            from lora2_train.format import load_adapter
            result["file_seed"] = json.loads(load_adapter(path).metadata["lora2_config"])["seed"]
    except D.ProcessesDiverged as e:
        result = {"error": str(e)}
    finally:
        net.close()
        (out and open(f"{out}/rank{rank}.json", "w").write(json.dumps(result)))
        dist.destroy_process_group()


def _compare_reallocations(tmp_path):
    """[(step, grown, shrunk, max |Δ| over parameters and optimizer state, tensors that differ, tensors compared,
    LoRA parameters, components cut by max_params, seeds of process 0, seeds of process 1)] per re-allocation
    both processes saved; the ranks and re-allocations must be the same on both."""
    steps = sorted(int(p.stem.split("step")[1]) for p in tmp_path.glob("rank0-step*.pt"))
    assert steps == sorted(int(p.stem.split("step")[1]) for p in tmp_path.glob("rank1-step*.pt"))
    rows = []
    for step in steps:
        a, b = (torch.load(tmp_path / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1))
        assert a["ranks"] == b["ranks"] and a["resized"] == b["resized"], step
        pairs = [(a["params"][n], b["params"][n]) for n in a["params"]]
        assert a["state"].keys() == b["state"].keys()
        pairs += [(s[k], b["state"][n][k]) for n, s in a["state"].items() for k in s]
        assert all(x.shape == y.shape for x, y in pairs), step
        deltas = [float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in pairs]
        grown = sum(new > old for old, new in a["resized"].values())
        rows.append((step, grown, len(a["resized"]) - grown, max(deltas), sum(d > 0 for d in deltas), len(deltas),
                     a["num_params"], a["cut"], a["seeds"], b["seeds"]))
    return rows


@pytest.mark.parametrize("seed, max_params, late", [(None, 0, False), (None, 70_000, False), (1234, 70_000, False),
                                                    (None, 0, True)],
                         ids=["no-seed", "no-seed-max-params", "seed", "no-seed-group-joined-late"])
def test_processes_seeded_alike_or_not_reallocate_identically(tmp_path, unet, seed, max_params, late):
    """Without --seed sd-scripts seeds each process differently; the rows of A every process draws when a
    component grows must still be the same (process 0's seed, agreed on when the network is created, or at
    its first step when the process group came later), and so must ν, the allocation under max_params and
    the optimizer state, whatever each process's data and aspect bucket: after every re-allocation both
    processes hold identical parameters and optimizer state."""
    r0, r1 = run_forked(_seed_worker, tmp_path, 2, unet, seed, max_params, late)
    rows = _compare_reallocations(tmp_path)
    print("step, grown, shrunk, max |Δ|, tensors differing, compared, parameters, cut, seeds 0, seeds 1:", *rows,
          sep="\n  ")
    assert len(rows) >= 2, (rows, r0, r1)
    assert all(grown and shrunk for _, grown, shrunk, *_ in rows), rows  # every re-allocation grows and shrinks
    assert all(delta == 0.0 for _, _, _, delta, *_ in rows), rows
    if max_params:  # the budget holds components below D(ν) at every re-allocation, and is kept
        assert all(n <= max_params and cut for *_, n, cut, _, _ in rows), rows
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    expected = (seed if seed is not None else r0["process_seed"]) % 2 ** 31
    assert r0["seed"] == r1["seed"] == r0["file_seed"] == expected
    assert [s for *_, s0, s1 in rows for s in (s0, s1)] == [[expected]] * 2 * len(rows)
    assert r0["steps"] == r1["steps"] == SEED_STEPS
