"""Paired datasets: manifests, the folder convention, fsspec URLs, crops, errors, and the
permissions of what is written."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import need_shared

from timfusion.platform.errors import UserError
from timfusion.tasks import build_task
from timfusion.tasks.datasets import PairedDataset, fingerprint, load_pair, load_records, read_manifest
from timfusion.tasks.imageio import atomic_write_text, image_size, read_image, write_image
from timfusion.tasks.synthetic import synthesized_once

IR_VIS = {"name": "ir_vis", "loss": {"intensity": 1.0}}


@pytest.fixture
def task():
    return build_task(IR_VIS)


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "MANIFEST.tsv"
    bad.write_text("pair\ta_path\nx\ta.png\n")
    with pytest.raises(UserError, match=r"MANIFEST.tsv: missing column\(s\) b_path"):
        read_manifest(str(bad))
    bad.write_text("pair\ta_path\tb_path\nx\t\tb.png\n")
    with pytest.raises(UserError, match=r"MANIFEST.tsv:2: empty"):
        read_manifest(str(bad))


def test_folder_convention_needs_role_folders(tmp_path, task):
    (tmp_path / "left").mkdir()
    with pytest.raises(UserError, match="expected MANIFEST.tsv or role folders ir/infrared/IR and vi/"):
        load_records(str(tmp_path), task)


def test_unmatched_pairs_are_reported(tmp_path, task):
    for folder, names in (("ir", ["a", "b"]), ("vi", ["a"])):
        (tmp_path / folder).mkdir()
        for name in names:
            write_image(tmp_path / folder / f"{name}.png", np.zeros((4, 4)))
    with pytest.raises(UserError, match="without a partner"):
        load_records(str(tmp_path), task)


def test_filters_and_splits(synthetic_ir_vis, task):
    records = load_records(str(synthetic_ir_vis), task)
    train = load_records(str(synthetic_ir_vis), task, split="train")
    assert 0 < len(train) < len(records)
    with pytest.raises(UserError, match="no column 'subset'"):
        load_records(str(synthetic_ir_vis), task, filters={"subset": "x"})
    assert fingerprint(records) == fingerprint(load_records(str(synthetic_ir_vis), task))
    assert fingerprint(train) != fingerprint(records)


def test_fsspec_url_roots(synthetic_ir_vis, task):
    local = load_records(str(synthetic_ir_vis), task)
    remote = load_records(f"file://{synthetic_ir_vis}", task)
    assert [r.name for r in remote] == [r.name for r in local]
    a, b = load_pair(remote[0])
    np.testing.assert_array_equal(a, read_image(local[0].a))


def test_random_crops_are_seeded_and_change_per_epoch(synthetic_ir_vis, task):
    records = load_records(str(synthetic_ir_vis), task)
    first = PairedDataset(records, crop=24, seed=5)
    again = PairedDataset(records, crop=24, seed=5)
    assert (first[0]["a"] == again[0]["a"]).all()
    again.set_epoch(1)
    assert not (first[0]["a"] == again[0]["a"]).all()
    full = PairedDataset(records)[0]
    assert full["a"].shape[-2:] == (64, 96)  # full size, never resized


def test_crop_larger_than_image_pads(synthetic_ir_vis, task):
    records = load_records(str(synthetic_ir_vis), task)
    item = PairedDataset(records, crop=80, seed=0, labels=True)[0]
    assert item["a"].shape == (1, 80, 80) and item["label"].shape == (80, 80)


def test_one_pixel_crops_are_tensors_whatever_the_flips(synthetic_ir_vis, task):
    records = load_records(str(synthetic_ir_vis), task)
    data = PairedDataset(records, crop=1, seed=0, labels=True)
    items = [data[index] for index in range(len(records))]  # every flip combination, at these seeds
    assert all(item["a"].shape == (1, 1, 1) and item["label"].shape == (1, 1) for item in items)


def test_unlabelled_pairs_and_padding_are_ignored_by_the_task_loss(synthetic_ir_vis, task):
    import dataclasses

    import torch

    from timfusion.tasks.heads import IGNORE_INDEX, segmentation_loss

    records = load_records(str(synthetic_ir_vis), task)
    padded = PairedDataset(records, crop=80, seed=0, labels=True, flip=False)[0]["label"]
    assert (padded[64:, :] == IGNORE_INDEX).all() and (padded[:64, :] != IGNORE_INDEX).all()
    unlabelled = dataclasses.replace(records[0], label=None)
    label = PairedDataset([unlabelled], labels=True)[0]["label"]
    assert (label == IGNORE_INDEX).all()
    logits = torch.randn(1, 3, *label.shape, requires_grad=True)
    loss = segmentation_loss(logits, label[None])
    loss.backward()
    assert float(loss) == 0.0 and torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


def test_cached_items_equal_decoded_ones(synthetic_ir_vis, task):
    records = load_records(str(synthetic_ir_vis), task)
    cached = PairedDataset(records, crop=24, seed=2, labels=True, cache=True)
    plain = PairedDataset(records, crop=24, seed=2, labels=True)
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for key in ("a", "b", "label"):
            assert (cached[1][key] == plain[1][key]).all()
    assert set(cached.cache) == {1}


def test_image_reading_modes(tmp_path):
    from PIL import Image

    sixteen = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    deep = read_image(tmp_path / "deep.png")
    assert deep.shape == (8, 8) and deep.max() <= 255 and deep.max() > 200
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    palette.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").ndim == 2
    gray_rgb = np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8)[..., None], 3, axis=2)
    Image.fromarray(gray_rgb).save(tmp_path / "grayrgb.png")
    assert read_image(tmp_path / "grayrgb.png").ndim == 2
    assert read_image(tmp_path / "grayrgb.png", keep_rgb_gray=True).ndim == 3
    Image.fromarray(np.zeros((5, 9), dtype=np.uint8)).save(tmp_path / "wide.png")
    assert image_size(tmp_path / "wide.png") == (5, 9) and image_size(f"file://{tmp_path}/deep.png") == (8, 8)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="text.png: not a readable image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(UserError, match="text.png: not a readable image"):
        image_size(tmp_path / "text.png")
    with pytest.raises(UserError, match="nothing.png: no such file"):
        read_image(tmp_path / "nothing.png")


def test_real_manifests_read(task):
    root = need_shared("data", "msrs")
    records = load_records(str(root), task)
    assert len(records) == 38 and all(r.label for r in records)
    a, b = load_pair(records[0])
    assert a.ndim == 2 and b.ndim == 3 and a.shape == b.shape[:2]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask-022", "umask-077", "umask-002"])
def test_written_files_and_folders_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    """Atomic writes go through an owner-only temporary file or folder: what is renamed into
    place must be as readable as a plain open or mkdir under the umask would leave it."""
    import os

    previous = os.umask(umask)
    try:
        write_image(tmp_path / "fused.png", np.zeros((4, 4)))
        atomic_write_text(tmp_path / "trials.json", "[]")
        data = synthesized_once("ir_vis", tmp_path / "cache", n=2, seed=0, size=(32, 32))
    finally:
        os.umask(previous)
    for path in (tmp_path / "fused.png", tmp_path / "trials.json", data / "MANIFEST.tsv"):
        assert path.stat().st_mode & 0o777 == mode, path
    assert data.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder: searchable too
