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


# ------------------------------------------------------------------------------------------- evaluation


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _image_bar(total: int, desc: str):
    """A tqdm bar counting embedded images (a callback taking the number done since the last call)."""
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="image", dynamic_ncols=True, disable=None, leave=False)

    def callback(n):
        bar.update(n)
        if bar.n >= total:
            bar.close()
    return callback


def _prompt_source(args):
    """(one prompt, prompt list, name of the list's source) from --prompt / --prompts / --prompt-template."""
    from .evaluate import EvalError, dreambooth_prompts, read_prompt_lines, repeat_prompts
    if not args.prompt_template and (args.token or args.class_name):
        raise EvalError("--token and --class go with --prompt-template")
    if args.images_per_prompt != 1 and not (args.prompts or args.prompt_template):
        raise EvalError("--images-per-prompt goes with --prompts or --prompt-template")
    if args.prompt_template:
        if not args.token or not args.class_name:
            raise EvalError("--prompt-template needs --token and --class")
        return None, dreambooth_prompts(args.prompt_template, args.token, args.class_name,
                                        args.images_per_prompt), f"--prompt-template {args.prompt_template}"
    if args.prompts:
        return None, repeat_prompts(read_prompt_lines(args.prompts), args.images_per_prompt), str(args.prompts)
    return args.prompt, None, "--prompt"


def _scorer(args):
    from .evaluate import Scorer
    return Scorer(args.clip, args.dino, device=args.device, batch_size=args.batch_size)


def cmd_eval(args) -> int:
    from .evaluate import embed_folder, evaluate_folder, format_table, list_images, match_prompts
    prompt, prompts, source = _prompt_source(args)
    images, _ = list_images(args.images, "generated images")  # bad folders and prompts fail before models load
    refs, _ = list_images(args.references, "reference images")
    match_prompts(images, prompt, prompts, source)
    scorer = _scorer(args)
    bar = _image_bar(len(images) + len(refs), "embedding")
    references = embed_folder(scorer, args.references, "reference images", _note, bar)
    result = evaluate_folder(scorer, args.images, references, prompt, prompts, source, _note, bar)
    result["images"], result["references"] = str(args.images), str(args.references)
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def cmd_prompts(args) -> int:
    from .evaluate import dreambooth_prompts
    print("\n".join(dreambooth_prompts(args.kind, args.token, args.class_name, args.images_per_prompt)))
    return 0


def cmd_eval_budget(args) -> int:
    from .eval_budget import budget_params, format_budget_table, parse_budget, quality_chart, series_of
    from .evaluate import EvalError, embed_folder, evaluate_folder, list_images, match_prompts
    from .format import atomic_write_bytes, load_adapter
    from .plot import png_bytes
    _check_output(args)
    prompt, prompts, source = _prompt_source(args)
    entries = []
    for adapter_path, budget_text, folder in args.entry:  # everything is checked before any model loads
        budget = parse_budget(budget_text)
        images, _ = list_images(folder, "generated images")
        match_prompts(images, prompt, prompts, source)
        entries.append((adapter_path, budget, folder, len(images)))
    refs, _ = list_images(args.references, "reference images")
    adapters, rows = {}, []
    for adapter_path, budget, folder, _n in entries:
        if adapter_path not in adapters:
            adapters[adapter_path] = load_adapter(adapter_path, mapped=True)
        params, _ = budget_params(adapters[adapter_path], budget)
        rows.append({"adapter": str(adapter_path), "label": Path(adapter_path).stem, "budget": str(budget),
                     "params": params, "images": str(folder)})
    labels = {}
    for r in rows:  # two files with one stem: the label is the path
        labels.setdefault(r["label"], set()).add(r["adapter"])
    for r in rows:
        if len(labels[r["label"]]) > 1:
            r["label"] = r["adapter"]
    scorer = _scorer(args)
    bar = _image_bar(len(refs) + sum(e[3] for e in entries), "embedding")
    references = embed_folder(scorer, args.references, "reference images", _note, bar)
    for r, (_a, _b, folder, _n) in zip(rows, entries):
        result = evaluate_folder(scorer, folder, references, prompt, prompts, source, _note, bar)
        r.update({k: result[k] for k in ("dino", "clip_i", "clip_t", "n_images", "n_references")})
        r["per_image"] = result["per_image"]
    if not rows:
        raise EvalError("no --entry given")
    image = quality_chart(series_of(rows), title=args.title, note=args.note)
    path = atomic_write_bytes(args.output, png_bytes(image), overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"chart": str(path), "models": scorer.models(), "references": str(args.references),
                          "entries": rows}, indent=1))
    else:
        print(format_budget_table(rows))
        print(f"wrote {path}")
    return 0


def _add_eval_commands(sub) -> None:
    def prompt_args(c):
        g = c.add_mutually_exclusive_group()
        g.add_argument("--prompt", help="one prompt for every generated image")
        g.add_argument("--prompts", help="a text file: one prompt per generated image, in sorted file-name order")
        g.add_argument("--prompt-template", choices=["object", "live"],
                       help="the 25 DreamBooth evaluation prompts for an object or a live subject "
                            "(with --token, --class, --images-per-prompt)")
        c.add_argument("--token", help="the subject's unique token for --prompt-template (e.g. sks)")
        c.add_argument("--class", dest="class_name", help="the subject's class noun for --prompt-template (e.g. dog)")
        c.add_argument("--images-per-prompt", type=int, default=1,
                       help="with --prompts/--prompt-template: consecutive images per prompt (default 1)")
        c.epilog = ("Without --prompt/--prompts/--prompt-template, each image's prompt is read from "
                    "<image name>.txt beside it.")

    def model_args(c):
        c.add_argument("--references", required=True, help="folder of the subject's reference photos")
        c.add_argument("--clip", required=True, help="CLIP model: a save_pretrained folder (with its image "
                                                     "processor and tokenizer) or a hub id in the local cache")
        c.add_argument("--dino", required=True, help="DINO ViT: a save_pretrained folder or a hub id in the local "
                                                     "cache (the protocol uses facebook/dino-vits16)")
        c.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
        c.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
        c.add_argument("--json", action="store_true", help="print the result as one JSON object")

    c = sub.add_parser("eval", help="DINO, CLIP-I and CLIP-T of generated images against reference photos")
    c.add_argument("--images", required=True, help="folder of generated images")
    model_args(c)
    prompt_args(c)
    c.set_defaults(func=cmd_eval)

    c = sub.add_parser("eval-budget", help="score one adapter at several rank budgets (one image folder each) and "
                                           "chart quality against adapter parameters")
    c.add_argument("--entry", nargs=3, action="append", required=True, metavar=("ADAPTER", "BUDGET", "IMAGES"),
                   help="an adapter file, a budget (full, max_rank=K, fraction=F, params=N) and the folder of "
                        "images generated with it under that budget; repeat for each budget and adapter")
    model_args(c)
    prompt_args(c)
    c.add_argument("-o", "--output", required=True, help="chart file (.png)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing chart")
    c.add_argument("--title", default="quality against adapter size", help="chart title")
    c.add_argument("--note", default=None, help="a line printed under the chart")
    c.set_defaults(func=cmd_eval_budget, suffix=".png")

    c = sub.add_parser("prompts", help="print the 25 DreamBooth evaluation prompts for a subject, one per line")
    c.add_argument("kind", choices=["object", "live"], help="object, or live subject (pets)")
    c.add_argument("--token", required=True, help="the subject's unique token (e.g. sks)")
    c.add_argument("--class", dest="class_name", required=True, help="the subject's class noun (e.g. dog)")
    c.add_argument("--images-per-prompt", type=int, default=1, help="repeat each prompt N times (default 1)")
    c.set_defaults(func=cmd_prompts)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lora2_train", description="LoRA²: adaptive-rank LoRA for SDXL")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LoRA² on a random reduced-width SDXL UNet with a planted teacher (CPU)")
    d.add_argument("--out", default="lora2_demo", help="output folder (default: ./lora2_demo)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 120)")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo")
    d.set_defaults(func=cmd_demo)
    _add_tool_commands(sub)
    _add_eval_commands(sub)
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
