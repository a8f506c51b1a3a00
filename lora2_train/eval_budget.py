"""Quality against rank budget: the same adapter cut to several load-time budgets, scored and charted.

Generating images needs an SDXL model, which this library does not run: the user samples the same prompts and
seeds once per (adapter, budget) — e.g. in ComfyUI with Load LoRA² Adapter's ``rank_budget`` — into one folder
each.  Each entry (adapter file, budget, image folder) is then scored against the subject's reference photos,
its parameter count is that of the adapter truncated as the loader truncates it (``tools.truncate``), and
:func:`quality_chart` draws each metric against adapter parameters, one line per adapter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .evaluate import EvalError

BUDGET_KINDS = ("full", "max_rank", "fraction", "params")
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


@dataclass(frozen=True)
class Budget:
    kind: str  # one of BUDGET_KINDS
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "max_rank":
            return f"max_rank={int(self.value)}"
        if self.kind == "params":
            return f"params={int(self.value)}"
        return f"fraction={self.value:g}"

    def truncate_kwargs(self) -> dict:
        return {"max_rank": {"max_rank": int(self.value or 0)}, "fraction": {"fraction": self.value},
                "params": {"params": int(self.value or 0)}}.get(self.kind, {})


def parse_budget(text: str) -> Budget:
    """``full``, ``max_rank=K`` (or ``rank=K``), ``fraction=F`` (0 < F ≤ 1) or ``params=N`` (N may end in k/M/G)."""
    t = str(text).strip().lower().replace("-", "_")
    if t in ("full", "0", "none"):
        return Budget("full")
    m = re.fullmatch(r"(max_rank|rank|fraction|params)\s*=\s*([0-9.eE+]+)\s*([kmg]?)", t)
    if not m:
        raise EvalError(f"budget {text!r}: expected full, max_rank=K, fraction=F or params=N (N may end in k/M)")
    kind = "max_rank" if m[1] == "rank" else m[1]
    try:
        value = float(m[2]) * _SUFFIX.get(m[3], 1.0)
    except ValueError:
        raise EvalError(f"budget {text!r}: {m[2]!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise EvalError(f"budget {text!r}: the value must be positive")
    if kind == "fraction" and value > 1:
        raise EvalError(f"budget {text!r}: a fraction lies in (0, 1]")
    if kind in ("max_rank", "params") and value != int(value):
        raise EvalError(f"budget {text!r}: {kind} must be a whole number")
    return Budget(kind, value)


def budget_params(adapter, budget: Budget) -> tuple[int, dict]:
    """(parameters, ranks) of `adapter` under `budget`, truncated exactly as the loader does."""
    from .tools import truncate

    cut = adapter if budget.kind == "full" else truncate(adapter, **budget.truncate_kwargs())
    return cut.num_parameters(), cut.ranks()


def quality_chart(series: list[dict], title: str = "quality against adapter size", note: str | None = None,
                  path=None):
    """One panel per metric (DINO, CLIP-I, CLIP-T) against adapter parameters; one line per adapter.

    `series`: ``[{"label": str, "points": [{"params": int, "budget": str, "dino", "clip_i", "clip_t"}]}]``.
    Returns the chart as an RGB numpy array (H, W, 3); optionally saves a PNG at `path`.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from .plot import figure_image

    if not series or not any(s["points"] for s in series):
        raise EvalError("nothing to chart: no scored entries")
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 4.2), dpi=90, squeeze=False)
    cmap = plt.get_cmap("tab10")
    markers = "os^Dv<>p"
    for ai, (key, name) in enumerate(METRICS):
        ax = axes[0, ai]
        for si, s in enumerate(series):
            pts = sorted(s["points"], key=lambda p: p["params"])
            xs = [p["params"] for p in pts]
            ax.plot(xs, [p[key] for p in pts], marker=markers[si % len(markers)], color=cmap(si % 10), lw=1.2,
                    ms=5, label=s["label"])
            if ai == 0:
                for p in pts:
                    ax.annotate(p["budget"], (p["params"], p[key]), textcoords="offset points", xytext=(3, 4),
                                fontsize=6, color=cmap(si % 10))
        ax.set_xlabel("adapter parameters")
        ax.set_ylabel(f"{name} (mean cosine)")
        ax.set_title(name)
        ax.xaxis.set_major_formatter(FuncFormatter(_human))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=8, color="firebrick")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    return figure_image(fig, path)


def _human(x, _pos=None) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def format_budget_table(rows: list[dict]) -> str:
    width = max([len("adapter")] + [len(r["label"]) for r in rows])
    bw = max([len("budget")] + [len(r["budget"]) for r in rows])
    lines = [f"{'adapter':<{width}}  {'budget':<{bw}}  {'params':>12}  {'DINO':>7}  {'CLIP-I':>7}  {'CLIP-T':>7}  "
             f"images"]
    for r in rows:
        lines.append(f"{r['label']:<{width}}  {r['budget']:<{bw}}  {r['params']:>12,}  {r['dino']:>7.4f}  "
                     f"{r['clip_i']:>7.4f}  {r['clip_t']:>7.4f}  {r['n_images']} in {r['images']}")
    return "\n".join(lines)


def series_of(rows: list[dict]) -> list[dict]:
    """Rows grouped into chart series by adapter label (first-seen order)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["label"], []).append(r)
    return [{"label": k, "points": v} for k, v in groups.items()]
