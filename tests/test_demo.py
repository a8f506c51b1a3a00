import json

import pytest
from PIL import Image

from lora2_train.demo import OUTPUTS, run_demo
from lora2_train.format import load_adapter


def test_demo_writes_ragged_adapter_chart_and_summary(tmp_path):
    events = []
    summary = run_demo(tmp_path, steps=20, callback=events.append)
    assert len(events) == 20
    for name in OUTPUTS:
        assert (tmp_path / name).exists()
    ad = load_adapter(tmp_path / "lora2_demo.safetensors")
    assert len(ad.modules) == 120  # 15 transformer blocks side by side × 8 attention projections
    assert all(k.startswith("lora_unet_blocks_") and "_transformer_blocks_0_attn" in k for k in ad.modules)
    ranks = ad.ranks()
    assert len(set(ranks.values())) >= 2, "per-module ranks should differ"
    assert json.loads(ad.metadata["lora2_ranks"]) == ranks
    assert summary["components"] == 120 and summary["steps"] == 20
    assert set(summary["level_means"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert -1 <= summary["spearman_planted"] <= 1 and 0 <= summary["zero_at_floor"] <= 1
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    img = Image.open(tmp_path / "ranks.png")
    assert img.size[0] > 400 and img.size[1] > 300
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(tmp_path, steps=1)
