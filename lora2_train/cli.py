"""Command line: ``python -m lora2_train <command>``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError
from .format import AdapterFormatError
from .progress import progress_bar
from .trainer import TrainingDiverged

EXPECTED_ERRORS = (ConfigError, AdapterFormatError, TrainingDiverged, OSError, ValueError, KeyError)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other error of this CLI."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_demo(args) -> int:
    from .demo import DEMO_CONFIG, run_demo
    steps = args.steps or DEMO_CONFIG["steps"]
    summary = run_demo(args.out, steps=steps, overwrite=args.overwrite, callback=progress_bar(steps))
    print(json.dumps(summary, indent=2))
    return 0


# ----------------------------------------------------------------------------------- adapter tools


def _load_all(paths: list[str]):
    from tqdm import tqdm

    from .format import load_adapter
    return [load_adapter(p, mapped=True) for p in tqdm(paths, desc="reading", unit="file", disable=None if len(paths) > 1 else True,
                                          leave=False)]


def _check_output(args) -> Path:
    out = Path(args.output)
    if out.suffix.lower() != args.suffix:
        raise ValueError(f"{out}: output must end in {args.suffix}")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    return out


def _save(adapter, args, inputs) -> int:
    from .format import save_adapter
    from .tools import inspect_adapter
    dtype = args.dtype or inputs[0].dtype_name()
    path = save_adapter(adapter, args.output, dtype=dtype, overwrite=args.overwrite)
    t = inspect_adapter(adapter)["totals"]
    print(f"wrote {path}: {t['modules']} modules, ranks {t['min_rank']}..{t['max_rank']} "
          f"(mean {t['mean_rank']:.1f}), {t['params']:,} parameters, {dtype}")
    return 0


def cmd_inspect(args) -> int:
    from .tools import inspect_adapter
    (adapter,) = _load_all([args.input])
    info = inspect_adapter(adapter)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    width = max(len(r["module"]) for r in info["modules"])
    print(f"{'module':<{width}}  {'shape':>22}  {'rank':>5}  {'alpha':>8}  {'params':>10}")
    for r in info["modules"]:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['module']:<{width}}  {shape:>22}  {r['rank']:>5}  {r['alpha']:>8.4g}  {r['params']:>10,}")
    t = info["totals"]
    print(f"\n{t['modules']} modules, {t['params']:,} parameters, ranks {t['min_rank']}..{t['max_rank']} "
          f"(mean {t['mean_rank']}); format {info['source']}, positions ordered by {info['order']}")
    print("size: " + ", ".join(f"{d} {b / 2**20:.2f} MiB" for d, b in t["bytes"].items()))
    for k, v in sorted(info["metadata"].items()):
        text = v if isinstance(v, str) else json.dumps(v)
        print(f"  {k}: {text if len(text) <= 100 else text[:97] + '...'}")
    return 0


def cmd_truncate(args) -> int:
    from .tools import truncate
    _check_output(args)
    (adapter,) = _load_all([args.input])
    return _save(truncate(adapter, max_rank=args.max_rank, fraction=args.fraction, params=args.params), args, [adapter])


def cmd_pad(args) -> int:
    from .tools import pad
    _check_output(args)
    (adapter,) = _load_all([args.input])
    return _save(pad(adapter, args.rank), args, [adapter])


def cmd_merge(args) -> int:
    from .tools import merge
    _check_output(args)
    adapters = _load_all(args.inputs)
    from .format import DTYPES
    merged = merge(adapters, weights=args.weights, mode=args.mode, rank=args.rank, energy=args.energy,
                   names=[str(p) for p in args.inputs], dtype=DTYPES[args.dtype or adapters[0].dtype_name()])
    return _save(merged, args, adapters)


def cmd_resize(args) -> int:
    from .tools import resize
    _check_output(args)
    (adapter,) = _load_all([args.input])
    return _save(resize(adapter, rank=args.rank, energy=args.energy), args, [adapter])


def cmd_plot(args) -> int:
    from .format import atomic_write_bytes
    from .plot import rank_chart, png_bytes
    _check_output(args)
    adapters = _load_all(args.inputs)
    image = rank_chart([a.ranks() for a in adapters], [Path(p).stem for p in args.inputs])
    path = atomic_write_bytes(args.output, png_bytes(image), overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _add_tool_commands(sub) -> None:
    def out_args(c, suffix=".safetensors"):
        c.add_argument("-o", "--output", required=True, help=f"output file ({suffix})")
        c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        c.set_defaults(suffix=suffix)
        if suffix == ".safetensors":
            c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                           help="output dtype (default: that of the (first) input)")

    c = sub.add_parser("inspect", help="per-module rank table, totals, sizes and metadata of an adapter")
    c.add_argument("input", help="a LoRA .safetensors file (LoRA², kohya, diffusers/PEFT, LyCORIS LoCon)")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.set_defaults(func=cmd_inspect)

    c = sub.add_parser("truncate", help="keep the first k positions of each module (a load-time rank budget)")
    c.add_argument("input")
    out_args(c)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-rank", type=int, help="keep at most K positions per module")
    g.add_argument("--fraction", type=float, help="keep ceil(F·rank) positions of each module, 0 < F ≤ 1")
    g.add_argument("--params", type=int, help="keep the most important positions within N parameters in total")
    c.set_defaults(func=cmd_truncate)

    c = sub.add_parser("pad", help="zero-pad every module to one rank (ΔW unchanged)")
    c.add_argument("input")
    out_args(c)
    c.add_argument("--rank", type=int, default=None, help="target rank ≥ the largest module rank (default: it)")
    c.set_defaults(func=cmd_pad)

    c = sub.add_parser("merge", help="weighted merge of adapters with any ranks")
    c.add_argument("inputs", nargs="+", metavar="IN", help="two or more adapters")
    out_args(c)
    c.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per input (default: 1 each for exact, 1/N for pad-average)")
    c.add_argument("--mode", choices=["exact", "pad-average"], default="exact",
                   help="exact: ΔW = Σ w_i ΔW_i (factors concatenated); pad-average: the paper's zero-pad "
                        "then average the factors (approximate)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="re-compress each merged module by SVD to at most R")
    g.add_argument("--energy", type=float, help="re-compress each merged module by SVD keeping this "
                                                "fraction of Σσ² (ragged ranks)")
    c.set_defaults(func=cmd_merge)

    c = sub.add_parser("resize", help="SVD re-compression to a rank or an energy threshold (ragged ranks)")
    c.add_argument("input")
    out_args(c)
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="at most R positions per module")
    g.add_argument("--energy", type=float, help="smallest rank keeping this fraction of Σσ², 0 < E ≤ 1")
    c.set_defaults(func=cmd_resize)

    c = sub.add_parser("plot", help="PNG chart of per-module ranks by UNet block; several inputs are compared")
    c.add_argument("inputs", nargs="+", metavar="IN")
    out_args(c, ".png")
    c.set_defaults(func=cmd_plot)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lora2_train", description="LoRA²: adaptive-rank LoRA for SDXL")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LoRA² on a random reduced-width SDXL UNet with a planted teacher (CPU)")
    d.add_argument("--out", default="lora2_demo", help="output folder (default: ./lora2_demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 120)")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo")
    d.set_defaults(func=cmd_demo)
    _add_tool_commands(sub)
    from .kohya.launch import add_train_parser
    add_train_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lora2_train {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lora2_train {args.command}: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still ends in one line; LORA2_DEBUG=1 shows the traceback
        if os.environ.get("LORA2_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lora2_train {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
