"""Conformance checks every registered fusion task must pass (register a task: it is tested here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SHARED

from timfusion.platform.config import compose, to_container
from timfusion.platform.errors import UserError
from timfusion.tasks import TASKS, FusionTask, build_task
from timfusion.tasks.base import fuse_pair, split_colour
from timfusion.tasks.datasets import PairedDataset, load_records
from timfusion.tasks.fusers import BASELINES
from timfusion.tasks.metrics import resolve_metrics


def make_task(name: str) -> FusionTask:
    return build_task(to_container(compose("fuse", [f"task={name}"]).task))


@pytest.fixture(scope="module")
def synthetic_sets(tmp_path_factory):
    """One small synthetic set per task, made lazily."""
    from timfusion.tasks.synthetic import synthesize

    made = {}

    def get(task: FusionTask):
        if task.name not in made:
            out = tmp_path_factory.mktemp(f"synth_{task.name}")
            synthesize(task.synthetic, out, n=4, seed=1, size=(48, 64))
            made[task.name] = out
        return made[task.name]

    return get


@pytest.mark.parametrize("name", TASKS.names())
class TestFusionTaskConformance:
    def test_config_builds_the_registered_class(self, name):
        task = make_task(name)
        assert isinstance(task, TASKS.get(name)) and task.name == name
        assert len(task.roles) == 2 and task.roles[0] != task.roles[1]
        assert all(len(folders) >= 1 for folders in task.role_folders)
        assert task.classes[0] == "background"

    def test_config_keys_are_checked_against_the_signature(self, name):
        config = to_container(compose("fuse", [f"task={name}"]).task)
        with pytest.raises(UserError, match="unknown key"):
            build_task({**config, "lossweights": {}})
        with pytest.raises(UserError, match="missing key"):
            build_task({"name": name})

    def test_default_metrics_exist(self, name):
        assert resolve_metrics("tang", make_task(name).metrics)

    def test_loss_is_finite_and_differentiable(self, name):
        task = make_task(name)
        loss = task.build_loss()
        gen = torch.Generator().manual_seed(0)
        a, b = torch.rand(2, 1, 32, 40, generator=gen), torch.rand(2, 1, 32, 40, generator=gen)
        fused = ((a + b) / 2).requires_grad_(True)
        total, parts = loss(a, b, fused)
        assert torch.isfinite(total) and total.item() > 0
        assert set(parts) == {k for k, w in task.loss_weights.items() if w}
        total.backward()
        assert torch.isfinite(fused.grad).all() and fused.grad.abs().sum() > 0

    def test_synthetic_data_loads_as_manifest_and_as_folders(self, name, synthetic_sets, tmp_path):
        task = make_task(name)
        root = synthetic_sets(task)
        records = load_records(str(root), task)
        assert len(records) == 4 and records == sorted(records, key=lambda r: r.name)
        # the same files through the folder convention (the manifest moved away)
        folder_root = tmp_path / "folders"
        for index, (_role, folders) in enumerate(zip(task.roles, task.role_folders, strict=True)):
            target = folder_root / folders[0]
            target.mkdir(parents=True)
            for record in records:
                src = record.a if index == 0 else record.b
                (target / f"{record.name}.png").write_bytes(open(src, "rb").read())
        assert [r.name for r in load_records(str(folder_root), task)] == [r.name for r in records]
        item = PairedDataset(records, crop=32, seed=0, labels=True)[0]
        assert item["a"].shape == item["b"].shape == (1, 32, 32)
        assert 0 <= item["a"].min() and item["a"].max() <= 1
        assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64

    def test_colour_policy_round_trip(self, name, synthetic_sets):
        task = make_task(name)
        record = load_records(str(synthetic_sets(task)), task)[0]
        from timfusion.tasks.datasets import load_pair

        a, b = load_pair(record)
        fused = fuse_pair(BASELINES.get("average")(), a, b)
        colour_sources = (a.ndim == 3) + (b.ndim == 3)
        assert fused.shape[:2] == a.shape[:2]
        assert (fused.ndim == 3) == (colour_sources > 0)
        assert fused.min() >= 0 and fused.max() <= 255

    def test_named_datasets_exist_in_shared(self, name):
        task = make_task(name)
        if not (SHARED / "data").exists():
            pytest.skip(f"{SHARED / 'data'} is absent")
        for key, spec in task.datasets.items():
            records = load_records(str(SHARED / "data" / spec.path), task, filters=spec.filter)
            assert records, key


def test_one_colour_source_keeps_its_chroma():
    rng = np.random.default_rng(0)
    gray = rng.uniform(0, 255, (8, 8))
    colour = rng.uniform(0, 255, (8, 8, 3))
    ya, yb, context = split_colour(gray, colour)
    np.testing.assert_allclose(ya, gray)
    np.testing.assert_allclose(context.restore(yb), colour, atol=1e-6)


def test_two_colour_sources_weight_chroma_by_saturation():
    grey = np.full((4, 4, 3), 100.0)
    red = np.zeros((4, 4, 3))
    red[..., 0] = 200.0
    _, _, context = split_colour(grey, red)
    restored = context.restore(np.full((4, 4), 100.0))
    assert restored[..., 0].mean() > restored[..., 1].mean() + 20  # red wins: grey has no saturation


def test_size_mismatch_is_an_error():
    with pytest.raises(UserError, match="differ in size"):
        split_colour(np.zeros((4, 4)), np.zeros((4, 5)))
