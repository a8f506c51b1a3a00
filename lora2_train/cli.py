"""Command line: ``python -m lora2_train <command>``."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError
from .format import AdapterFormatError
from .trainer import TrainingDiverged

EXPECTED_ERRORS = (ConfigError, AdapterFormatError, TrainingDiverged, FileExistsError, FileNotFoundError,
                   ValueError, KeyError)


def _progress_bar(total: int):
    """A trainer callback drawing a tqdm bar (created at the first step, so early errors print alone)."""
    from tqdm import tqdm
    state = {}

    def callback(e):
        bar = state.get("bar") or state.setdefault("bar", tqdm(total=total, unit="step", dynamic_ncols=True))
        bar.n = e.step
        ranks = list(e.ranks.values())
        bar.set_postfix_str(f"loss={e.loss:.4g} mse={e.mse:.4g} rank={min(ranks)}..{max(ranks)} "
                            f"mean={sum(ranks) / len(ranks):.1f} params={e.num_params}", refresh=False)
        bar.refresh()
        if e.step >= e.total:
            bar.close()
    return callback


def cmd_demo(args) -> int:
    from .demo import DEMO_CONFIG, run_demo
    steps = args.steps or DEMO_CONFIG["steps"]
    summary = run_demo(args.out, steps=steps, overwrite=args.overwrite, callback=_progress_bar(steps))
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora2_train", description="LoRA²: adaptive-rank LoRA for SDXL")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LoRA² on a random reduced-width SDXL UNet with a planted teacher (CPU)")
    d.add_argument("--out", default="lora2_demo", help="output folder (default: ./lora2_demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 120)")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo")
    d.set_defaults(func=cmd_demo)
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


if __name__ == "__main__":
    sys.exit(main())
