"""Rank charts (PNG): per-module ranks grouped by UNet block, and rank history over training."""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

_SECTIONS = (("input_blocks", "down"), ("middle_block", "mid"), ("output_blocks", "up"))


def block_of(key: str) -> str:
    """Group label of a kohya key: 'down.4', 'mid', 'up.3', 'te1', 'te2' (ldm UNet naming)."""
    if key.startswith("lora_te1_"):
        return "te1"
    if key.startswith("lora_te2_"):
        return "te2"
    m = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)", key)
    if not m:
        return "other"
    label = dict(_SECTIONS)[m[1]]
    return "mid" if label == "mid" else f"{label}.{m[2]}"


def component_of(key: str) -> str:
    """Short component label: 'attn1.q', 'attn2.out', 'ff', 'conv', …"""
    m = re.search(r"(attn[12])_(to_q|to_k|to_v|to_out)", key)
    if m:
        return f"{m[1]}.{m[2][3:]}"
    for pat, label in (("ff_net", "ff"), ("proj_in", "proj"), ("proj_out", "proj"), ("self_attn", "te.attn"),
                       ("mlp_fc", "te.mlp"), ("layers_", "conv"), ("skip_connection", "conv")):
        if pat in key:
            return label
    return "other"


def _order_key(block: str):
    order = {"te1": -2, "te2": -1, "down": 0, "mid": 1, "up": 2, "other": 3}
    head, _, idx = block.partition(".")
    return order.get(head, 3), int(idx) if idx.isdigit() else 0


def mean_rank_by_block(ranks: dict[str, int]) -> "OrderedDict[str, float]":
    groups: dict[str, list[int]] = {}
    for k, r in ranks.items():
        groups.setdefault(block_of(k), []).append(r)
    return OrderedDict((b, sum(v) / len(v)) for b, v in sorted(groups.items(), key=lambda kv: _order_key(kv[0])))


def rank_chart(ranks_list: list[dict[str, int]], labels: list[str] | None = None,
               history: list[dict] | None = None, title: str = "LoRA² ranks", path: str | Path | None = None):
    """Draw the rank chart and return it as an RGB numpy array (H, W, 3); optionally save a PNG.

    Panels: (1) every module's rank in UNet order, coloured by component, one
    marker style per adapter; (2) mean rank per block (grouped bars per adapter);
    (3) when `history` is given, mean rank per block over training steps.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    labels = labels or [f"adapter {i + 1}" for i in range(len(ranks_list))]
    heat = len(ranks_list) >= 2
    n_panels = 2 + bool(history) + heat
    fig, axes = plt.subplots(n_panels, 1, figsize=(11, 3.2 * n_panels), dpi=90, squeeze=False)
    axes = axes[:, 0]
    ax = axes[0]
    comps = sorted({component_of(k) for r in ranks_list for k in r})
    cmap = plt.get_cmap("tab10")
    markers = "os^D"
    for ai, ranks in enumerate(ranks_list):
        keys = sorted(ranks, key=lambda k: (_order_key(block_of(k)), k))
        for ci, comp in enumerate(comps):
            xs = [i for i, k in enumerate(keys) if component_of(k) == comp]
            ax.scatter(xs, [ranks[keys[i]] for i in xs], s=10, color=cmap(ci % 10), marker=markers[ai % 4],
                       label=f"{comp}" if ai == 0 else None, alpha=0.8)
    ax.set_ylabel("rank")
    ax.set_xlabel("module (UNet order)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(len(comps), 8), loc="upper right")

    ax = axes[1]
    blocks = list(OrderedDict.fromkeys(b for r in ranks_list for b in mean_rank_by_block(r)))
    blocks.sort(key=_order_key)
    width = 0.8 / len(ranks_list)
    for ai, ranks in enumerate(ranks_list):
        means = mean_rank_by_block(ranks)
        ax.bar(np.arange(len(blocks)) + ai * width, [means.get(b, 0) for b in blocks], width, label=labels[ai])
    ax.set_xticks(np.arange(len(blocks)) + 0.4 - width / 2)
    ax.set_xticklabels(blocks, rotation=60, fontsize=7)
    ax.set_ylabel("mean rank")
    ax.legend(fontsize=8)

    if heat:
        _heatmap(axes[2], ranks_list, labels, blocks, comps)
    if history:
        ax = axes[-1]
        steps = [h["step"] for h in history]
        per_block = [mean_rank_by_block(h["ranks"]) for h in history]
        for bi, b in enumerate(per_block[-1]):
            ax.plot(steps, [pb.get(b, float("nan")) for pb in per_block], label=b, color=cmap(bi % 10), lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("mean rank")
        ax.legend(fontsize=6, ncol=6)
    fig.tight_layout()
    return figure_image(fig, path)


def planted_chart(plan: dict[str, int], ranks: dict[str, float], history: list[dict] | None = None,
                  title: str = "LoRA² on a planted-rank teacher", path: str | Path | None = None):
    """Learned rank against planted rank (one dot per component, level means joined; rank-0 components
    at x = 0), and, with `history`, the mean learned rank of each planted level over training.
    Returns an RGB array (H, W, 3); optionally saves a PNG."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    levels = sorted(set(plan.values()))
    pos = {v: i for i, v in enumerate(levels)}
    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(11 if history else 6, 4), dpi=90, squeeze=False)
    ax = axes[0, 0]
    jitter = np.random.default_rng(0)
    xs = [pos[plan[k]] + jitter.uniform(-0.15, 0.15) for k in plan]
    ax.scatter(xs, [ranks[k] for k in plan], s=12, alpha=0.6, color="tab:blue", label="component")
    means = [np.mean([ranks[k] for k in plan if plan[k] == v]) for v in levels]
    ax.plot(range(len(levels)), means, "o-", color="tab:red", label="mean per level")
    ax.plot(range(len(levels)), levels, "k--", lw=0.8, label="learned = planted")
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([str(v) for v in levels])
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("planted rank")
    ax.set_ylabel("learned rank D(ν)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    if history:
        ax = axes[0, 1]
        cmap = plt.get_cmap("viridis")
        steps = [h["step"] for h in history]
        for i, v in enumerate(levels):
            keys = [k for k in plan if plan[k] == v]
            ax.plot(steps, [np.mean([h["ranks"][k] for k in keys]) for h in history], color=cmap(i / max(1, len(levels) - 1)),
                    label=f"planted {v}")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("step")
        ax.set_ylabel("mean allocated rank")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return figure_image(fig, path)


def figure_image(fig, path: str | Path | None = None):
    """A drawn matplotlib figure as an RGB array (H, W, 3); saved as `path` too when given; the figure is closed."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        fig.savefig(path)
    plt.close(fig)
    return image


def _heatmap(ax, ranks_list, labels, blocks, comps) -> None:
    """Adapters × (block, component) mean ranks as a heat map, one row per adapter."""
    import numpy as np

    cols = [(b, c) for b in blocks for c in comps]
    grid = np.full((len(ranks_list), len(cols)), np.nan)
    for ai, ranks in enumerate(ranks_list):
        sums: dict[tuple, list[int]] = {}
        for k, r in ranks.items():
            sums.setdefault((block_of(k), component_of(k)), []).append(r)
        for ci, col in enumerate(cols):
            if col in sums:
                grid[ai, ci] = sum(sums[col]) / len(sums[col])
    used = ~np.all(np.isnan(grid), axis=0)
    grid, cols = grid[:, used], [c for c, u in zip(cols, used) if u]
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    step = max(1, len(cols) // 40)
    ax.set_xticks(range(0, len(cols), step))
    ax.set_xticklabels([f"{b} {c}" for b, c in cols[::step]], rotation=75, fontsize=5)
    ax.set_title("mean rank per block and component", fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.02, pad=0.01)


def png_bytes(image) -> bytes:
    """PNG encoding of an RGB array (H, W, 3) uint8."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
