"""``timfusion evaluate``: one folder, method folders with ranks, restriction, missing images, VIFB."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import need_shared

from timfusion.tasks.metrics import DEFAULT_METRICS


@pytest.fixture(scope="module")
def fused_methods(synthetic_ir_vis, tmp_path_factory):
    from timfusion.platform.cli import main

    root = tmp_path_factory.mktemp("fused")
    for baseline in ("average", "maximum"):
        assert main(["fuse", f"model=baseline:{baseline}", f"data.root={synthetic_ir_vis}",
                     f"out={root / baseline}"]) == 0
    return root


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_single_folder_writes_csv_json_and_prints(cli, synthetic_ir_vis, fused_methods, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={fused_methods / 'average'}",
                            "metrics=[EN,MI,Qabf]", f"out={out}")
    assert code == 0, err
    rows = read_csv(out / "metrics.csv")
    assert list(rows[0]) == ["name", "EN", "MI", "Qabf"] and len(rows) == 6
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert set(summary) == {"EN", "MI", "Qabf"} and "std" in summary["MI"]
    assert "mean" in stdout and "Qabf" in stdout


def test_default_metric_set_is_the_whole_definition(cli, synthetic_ir_vis, fused_methods, tmp_path):
    code, _, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={fused_methods / 'maximum'}",
                       "definition=vifb", f"out={tmp_path}")
    assert code == 0, err
    assert list(read_csv(tmp_path / "metrics.csv")[0])[1:] == DEFAULT_METRICS["vifb"]


def test_method_folders_are_ranked(cli, synthetic_ir_vis, fused_methods, tmp_path):
    code, stdout, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={fused_methods}",
                            "metrics=[SD,MI]", f"out={tmp_path}")
    assert code == 0, err
    ranks = (tmp_path / "ranks.md").read_text()
    assert "## SD (higher is better)" in ranks and "maximum" in ranks and "average" in ranks
    assert (tmp_path / "ranks.png").stat().st_size > 1000
    assert (tmp_path / "average" / "metrics.csv").exists()
    assert "mean rank" in stdout


def test_missing_fused_images(cli, synthetic_ir_vis, fused_methods, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    first = sorted((fused_methods / "average").glob("*.png"))[0]
    (partial / first.name).write_bytes(first.read_bytes())
    code, _, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={partial}",
                       f"out={tmp_path / 'o'}")
    assert code == 2 and "no fused image for 5 of 6" in err
    code, _, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={partial}",
                       f"out={tmp_path / 'o'}", "skip_missing=true", "metrics=[EN]")
    assert code == 0, err
    assert len(read_csv(tmp_path / "o" / "metrics.csv")) == 1


def test_unknown_metric_lists_valid(cli, synthetic_ir_vis, fused_methods, tmp_path):
    code, _, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={fused_methods}",
                       "metrics=[EN,Nope]", f"out={tmp_path}")
    assert code == 2 and "unknown tang metric(s) Nope; valid:" in err


@pytest.mark.parametrize(
    "override, message",
    [("batch=0", "batch must be >= 1, got 0"), ("device=gpu9", "device=gpu9: expected cpu, cuda or cuda:N")],
)
def test_bad_settings_are_one_line_before_scoring(cli, synthetic_ir_vis, fused_methods, tmp_path, override,
                                                  message):
    code, _, err = cli("evaluate", f"data.root={synthetic_ir_vis}", f"fused={fused_methods}", override,
                       f"out={tmp_path / 'eval'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "eval").exists()


def test_a_metric_that_cannot_score_small_images_names_itself(cli, tmp_path):
    # VIF's coarsest scale filters a 1/8-size image with a 5x5 kernel: 32x32 images are too small
    small, fused = tmp_path / "small", tmp_path / "f"
    assert cli("data", "synth", f"out={small}", "n=2", "size=[32,32]")[0] == 0
    assert cli("fuse", "model=baseline:average", f"data.root={small}", f"out={fused}")[0] == 0
    code, _, err = cli("evaluate", f"data.root={small}", f"fused={fused}", "metrics=[EN,VIF]",
                       f"out={tmp_path / 'eval'}")
    assert code == 2 and "VIF cannot score 32x32 images" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "eval").exists()
    assert cli("evaluate", f"data.root={small}", f"fused={fused}", "metrics=[EN,SSIM]",
               f"out={tmp_path / 'eval'}")[0] == 0


def test_vifb_rank_table_of_three_chosen_methods(cli, tmp_path):
    fused = need_shared("data", "vifb", "fused")
    code, _, err = cli("evaluate", "data.dataset=vifb", f"fused={fused}", "methods=[ADF,CBF,TIF]",
                       "metrics=[EN,SF,Qabf]", f"out={tmp_path}")
    assert code == 0, err
    summary = read_csv(tmp_path / "summary.csv")
    assert sorted(row["method"] for row in summary) == ["ADF", "CBF", "TIF"]
    assert (tmp_path / "ranks.md").read_text().count("## ") == 4


@pytest.mark.slow
def test_vifb_rank_table_of_25_methods(cli, tmp_path):
    need_shared("data", "vifb", "fused")
    code, stdout, err = cli("evaluate", "data.dataset=vifb",
                            "fused=" + str(need_shared("data", "vifb", "fused")),
                            "metrics=[EN,SD,SF,AG,MI,SCD,VIF,Qabf,SSIM]", f"out={tmp_path}")
    assert code == 0, err
    summary = read_csv(tmp_path / "summary.csv")
    assert len(summary) == 25
    assert (tmp_path / "ranks.md").read_text().count("## ") == 10
