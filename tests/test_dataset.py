import pytest
import torch
from PIL import Image

from lora2_train.dataset import DatasetError, from_images, load_folder, resize_center_crop, stack


def _png(path, w, h, color=(255, 0, 0), mode="RGB"):
    Image.new(mode, (w, h), color).save(path)


def test_folder_captions_fallback_and_order(tmp_path):
    _png(tmp_path / "b.png", 40, 20, (0, 255, 0))
    _png(tmp_path / "a.jpg", 20, 40, (255, 0, 0))
    _png(tmp_path / "c.webp", 16, 16, (0, 0, 255))
    (tmp_path / "a.txt").write_text("  a red\n square  \n")
    (tmp_path / "c.txt").write_text("   \n")  # empty caption file: instance prompt
    (tmp_path / "notes.md").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"not an image")
    ex = load_folder(tmp_path, 16, instance_prompt="photo of sks")
    assert [e.source.rsplit("/", 1)[-1] for e in ex] == ["a.jpg", "b.png", "c.webp"]
    assert [e.caption for e in ex] == ["a red square", "photo of sks", "photo of sks"]
    for e in ex:
        assert e.image.shape == (3, 16, 16) and e.image.dtype == torch.float32
        assert 0.0 <= float(e.image.min()) and float(e.image.max()) <= 1.0
    assert torch.allclose(ex[1].image[1], torch.ones(16, 16), atol=1e-6)  # green channel of b.png
    assert float(ex[1].image[0].max()) < 1e-6
    batch = stack(ex)
    assert batch.shape == (3, 16, 16, 3)


def test_resize_center_crop_keeps_the_center(tmp_path):
    img = torch.zeros(3, 20, 60)
    img[:, :, 20:40] = 1.0  # white middle third of a wide image
    out = resize_center_crop(img, 10)
    assert out.shape == (3, 10, 10)
    # only the white middle survives the crop (antialiasing softens the outermost columns a little)
    assert torch.allclose(out[:, :, 1:-1], torch.ones(3, 10, 8), atol=1e-5)
    assert float(out.min()) > 0.8
    tall = resize_center_crop(torch.rand(3, 50, 10), (8, 8))
    assert tall.shape == (3, 8, 8)
    up = resize_center_crop(torch.rand(3, 4, 6), 12)  # upscaling works too
    assert up.shape == (3, 12, 12)


def test_palette_alpha_and_grey_images_become_rgb(tmp_path):
    _png(tmp_path / "p.png", 12, 12, 3, mode="P")
    _png(tmp_path / "a.png", 12, 12, (10, 20, 30, 0), mode="RGBA")
    _png(tmp_path / "g.png", 12, 12, 128, mode="L")
    ex = load_folder(tmp_path, 12)
    assert all(e.image.shape == (3, 12, 12) for e in ex)
    g = ex[1].image
    assert torch.allclose(g, torch.full_like(g, 128 / 255), atol=1e-6)


@pytest.mark.parametrize("case", ["missing", "file", "empty", "blank"])
def test_folder_errors_are_one_line_and_name_the_folder(tmp_path, case):
    target = tmp_path / "data"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
        (target / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError) as ei:
        load_folder("" if case == "blank" else target, 32)
    msg = str(ei.value)
    assert "\n" not in msg
    if case != "blank":
        assert str(target) in msg
    assert {"missing": "does not exist", "file": "not a folder", "empty": "no images",
            "blank": "folder"}[case] in msg


def test_unreadable_image_is_named(tmp_path):
    _png(tmp_path / "good.png", 8, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError) as ei:
        load_folder(tmp_path, 8)
    assert str(tmp_path / "broken.png") in str(ei.value) and "unreadable image" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_bad_resolution(tmp_path):
    _png(tmp_path / "a.png", 8, 8)
    with pytest.raises(DatasetError, match="resolution"):
        load_folder(tmp_path, 4)
    with pytest.raises(DatasetError, match="resolution"):
        load_folder(tmp_path, "big")


def test_image_batch_with_captions():
    imgs = torch.rand(3, 24, 32, 3)  # ComfyUI IMAGE layout
    ex = from_images(imgs, "one\n\ntwo\nthree", 16, instance_prompt="sks")
    assert [e.caption for e in ex] == ["one", "two", "three"]
    assert all(e.image.shape == (3, 16, 16) for e in ex)
    assert [e.source for e in ex] == ["batch[0]", "batch[1]", "batch[2]"]
    piped = from_images(imgs, "one | two|three", 16)
    assert [e.caption for e in piped] == ["one", "two", "three"]
    same = from_images(imgs, "a  photo\nof sks", 16)  # line count != batch size: one caption for all
    assert [e.caption for e in same] == ["a photo of sks"] * 3
    assert {e.caption for e in from_images(imgs, "a | b", 16)} == {"a | b"}  # 2 parts for 3 images: one caption
    fallback = from_images(imgs, "", 16, instance_prompt="photo of sks")
    assert {e.caption for e in fallback} == {"photo of sks"}
    chw = from_images(imgs.permute(0, 3, 1, 2), "x")  # channels-first, no resize
    assert chw[0].image.shape == (3, 24, 32)
    assert torch.equal(chw[0].image, imgs[0].permute(2, 0, 1))


def test_image_batch_errors():
    with pytest.raises(DatasetError, match="channels"):
        from_images(torch.rand(2, 8, 8, 7))
    with pytest.raises(DatasetError, match="no image"):
        from_images(torch.rand(0, 8, 8, 3))
    with pytest.raises(DatasetError, match="tensor"):
        from_images([[1, 2]])


# ---- aspect-ratio buckets ---------------------------------------------------------------------------
def test_bucket_set_by_hand_and_sdxl_buckets():
    from lora2_train.dataset import bucket_sizes

    # widths 64…256 (step 64) at area 128²: heights 256, 128, 85→64, 64; plus the transposed pairs
    assert bucket_sizes(128, min_side=64, max_side=256) == [(64, 256), (64, 192), (128, 128), (192, 64), (256, 64)]
    sdxl = bucket_sizes(1024)
    for hw in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
               (1536, 640), (640, 1536)]:
        assert hw in sdxl, hw
    assert all(h % 64 == 0 and w % 64 == 0 and 0.9 * 1024 ** 2 <= h * w <= 1024 ** 2 for h, w in sdxl)
    assert min(h / w for h, w in sdxl) == 0.25 and max(h / w for h, w in sdxl) == 4.0  # max_side 2048
    assert bucket_sizes(64) == [(64, 64)]  # min_side lowered to the resolution
    with pytest.raises(DatasetError, match="step"):
        bucket_sizes(32)


def test_bucket_assignment_and_sdxl_size_conditioning_by_hand(tmp_path):
    from lora2_train.dataset import bucket_sizes, nearest_bucket

    sdxl = bucket_sizes(1024)
    assert nearest_bucket(300, 200, sdxl) == (1216, 832)  # 1.5: |ln 1.4615 − ln 1.5| = 0.026 is the nearest
    assert nearest_bucket(500, 500, sdxl) == (1024, 1024)
    assert nearest_bucket(100, 1000, sdxl) == (512, 2048)  # beyond the range: the most extreme bucket
    _png(tmp_path / "wide.png", 100, 40)  # PIL size (w, h): a 40×100 image
    _png(tmp_path / "square.png", 30, 30)
    ex = load_folder(tmp_path, 128, buckets=bucket_sizes(128, min_side=64, max_side=256))
    square, wide = ex
    # 40×100 (0.4) → bucket 64×192 (|ln ⅓ − ln 0.4| = 0.18 < |ln ¼ − ln 0.4| = 0.47); scale max(64/40, 192/100)
    # = 1.92 → 77×192, crop rows (77 − 64) // 2 = 6 from the top, no columns
    assert wide.image.shape == (3, 64, 192)
    assert (wide.original_size, wide.crop_top_left, wide.target_size) == ((40, 100), (6, 0), (64, 192))
    assert (square.original_size, square.crop_top_left, square.target_size) == ((30, 30), (0, 0), (128, 128))
    plain = load_folder(tmp_path, 16)  # no buckets: the square crop, with its conditioning
    assert plain[1].image.shape == (3, 16, 16)
    assert (plain[1].original_size, plain[1].crop_top_left, plain[1].target_size) == ((40, 100), (0, 12), (16, 16))
    batch = from_images(torch.rand(2, 40, 100, 3), "a|b", 128, buckets=bucket_sizes(128, 64, 256))
    assert [e.target_size for e in batch] == [(64, 192)] * 2 and batch[0].crop_top_left == (6, 0)


def test_mixed_aspect_dataset_trains_with_one_bucket_per_batch(tmp_path):
    import torch.nn.functional as F

    from lora2_train.dataset import bucket_sizes
    from lora2_train.trainer import SampledDataset, Trainer
    from test_trainer import setup

    for i, (w, h) in enumerate([(100, 40), (90, 36), (50, 50), (60, 64), (30, 80), (40, 110)]):
        _png(tmp_path / f"{i}.png", w, h, (40 * i, 255 - 30 * i, 100))
    ex = load_folder(tmp_path, 128, "sks", buckets=bucket_sizes(128, min_side=64, max_side=256))
    assert {e.target_size for e in ex} == {(64, 192), (128, 128), (192, 64)}
    g = torch.Generator().manual_seed(0)
    context = torch.randn(6, 32, generator=g)
    data = []
    for e in ex:  # stand-ins for the VAE (8× down, 4 channels) and the SDXL size embedding
        pix = F.avg_pool2d(e.image[None], 8)[0]
        sizes = torch.tensor([*e.original_size, *e.crop_top_left, *e.target_size], dtype=torch.float32) / 256
        data.append({"latents": torch.cat([pix, pix.mean(0, keepdim=True)]) * 2 - 1,
                     "cond": {"context": context, "y": F.pad(sizes, (0, 58))}})
    dataset = SampledDataset(data)
    shapes = []
    sample = dataset.sample
    dataset.sample = lambda n, gen: (lambda b: (shapes.append(tuple(b["latents"].shape)), b)[1])(sample(n, gen))
    unet, net, _, cfg = setup(steps=6, batch_size=2, resize_every=3)
    res = Trainer(unet, net, dataset, cfg).train()
    assert res.steps == 6 and torch.isfinite(torch.tensor(res.last.loss))
    assert len(set(shapes)) >= 2  # batches of several buckets, each batch of one size (else stack fails)
