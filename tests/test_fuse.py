"""``timfusion fuse``: pair and dataset modes, colour, sizes, and every bad-input error."""

from __future__ import annotations

import numpy as np
import pytest

from timfusion.tasks.fusers import BASELINES
from timfusion.tasks.imageio import read_image, write_image


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "ir.png"
    b = tmp_path / "vis.jpg"
    write_image(a, rng.uniform(0, 255, (37, 53)))
    write_image(b, rng.uniform(0, 255, (37, 53, 3)))
    return a, b


@pytest.mark.parametrize("baseline", BASELINES.names())
def test_pair_mode_keeps_colour_and_size(cli, pair, tmp_path, baseline):
    out = tmp_path / f"fused_{baseline}.png"
    code, out_text, err = cli("fuse", f"model=baseline:{baseline}", f"a={pair[0]}", f"b={pair[1]}",
                              f"out={out}")
    assert code == 0, err
    fused = read_image(out, keep_rgb_gray=True)
    assert fused.shape == (37, 53, 3)
    assert not list(tmp_path.glob("*.part"))


def test_dataset_mode(cli, synthetic_ir_vis, tmp_path):
    out = tmp_path / "fused"
    code, _, err = cli("fuse", "model=baseline:maximum", f"data.root={synthetic_ir_vis}", f"out={out}",
                       "data.split=val")
    assert code == 0, err
    written = sorted(p.stem for p in out.glob("*.png"))
    from timfusion.tasks import build_task
    from timfusion.tasks.datasets import load_records

    val = load_records(str(synthetic_ir_vis), build_task({"name": "ir_vis", "loss": {}}), split="val")
    assert written == [r.name for r in val]


def test_existing_output_is_refused_then_overwritten(cli, pair, tmp_path):
    out = tmp_path / "f.png"
    out.write_bytes(b"keep me")
    code, _, err = cli("fuse", f"a={pair[0]}", f"b={pair[1]}", f"out={out}")
    assert code == 2 and "exists" in err and "overwrite=true" in err
    assert out.read_bytes() == b"keep me"
    assert cli("fuse", f"a={pair[0]}", f"b={pair[1]}", f"out={out}", "overwrite=true")[0] == 0
    assert read_image(out).shape[:2] == (37, 53)


def test_size_mismatch_needs_resize(cli, pair, tmp_path):
    other = tmp_path / "small.png"
    write_image(other, np.random.default_rng(1).uniform(0, 255, (20, 30, 3)))
    out = tmp_path / "f.png"
    code, _, err = cli("fuse", f"a={pair[0]}", f"b={other}", f"out={out}")
    assert code == 2 and "small.png: size 30x20 differs" in err and not out.exists()
    assert cli("fuse", f"a={pair[0]}", f"b={other}", f"out={out}", "resize=true")[0] == 0
    assert read_image(out, keep_rgb_gray=True).shape == (37, 53, 3)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("not_image", "not a readable image"),
        ("unknown_model", "unknown model reference"),
        ("unknown_baseline", "model=baseline:nope: unknown baseline 'nope'; known: average"),
        ("bad_suffix", "cannot write images with suffix '.xyz'"),
        ("one_source", "give both sources"),
        ("bad_device", "device=gpu9: expected cpu, cuda or cuda:N"),
        ("absent_device", "device=cuda:64: this machine has"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, pair, tmp_path, case, message):
    a, b = str(pair[0]), str(pair[1])
    out = tmp_path / "out.png"
    extra = []
    if case == "missing":
        a = str(tmp_path / "nope.png")
    elif case == "not_image":
        (tmp_path / "text.png").write_text("hello")
        a = str(tmp_path / "text.png")
    elif case == "unknown_model":
        extra = ["model=runz:/x"]
    elif case == "unknown_baseline":
        extra = ["model=baseline:nope"]
    elif case == "bad_suffix":
        out = tmp_path / "out.xyz"
    elif case in ("bad_device", "absent_device"):
        extra = ["device=gpu9" if case == "bad_device" else "device=cuda:64"]
    args = ["fuse", f"a={a}", f"out={out}", *extra] + ([] if case == "one_source" else [f"b={b}"])
    code, _, err = cli(*args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_real_process_exit_status(pair, tmp_path):
    from helpers import run_cli

    result = run_cli("fuse", f"a={tmp_path / 'none.png'}", f"b={pair[1]}", f"out={tmp_path / 'o.png'}")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("none.png: no such file")
