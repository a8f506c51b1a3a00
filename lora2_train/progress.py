"""A terminal progress bar for training callbacks (CLI and sd-scripts launcher)."""
from __future__ import annotations


def progress_bar(total: int):
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
