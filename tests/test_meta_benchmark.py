"""The adaptation benchmark (benchmarks/meta.py): the references, the step counts, the target,
the re-report of a stored run, and a toy run end to end. The issue's target is judged by these."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("meta")


def falling(start: float, per_step: float, steps: int, every: int = 10) -> list[tuple[int, float]]:
    """A validation curve that falls linearly: (step, loss) every ``every`` steps."""
    return [(step, start - per_step * step) for step in range(0, steps + 1, every)]


def test_reference_is_the_mean_of_the_validations_ending_at_the_step(bench):
    random_curve = falling(5.0, 0.001, 1000)
    last_five = [4.0 + 0.001 * k for k in (0, 10, 20, 30, 40)]
    assert bench.reference_loss(random_curve) == pytest.approx(sum(last_five) / 5)
    assert bench.reference_loss(random_curve, 1000) == bench.reference_loss(random_curve)
    assert bench.reference_loss(random_curve, 300) == pytest.approx(5.0 - 0.001 * 280)
    assert bench.reference_loss(random_curve, 20) == pytest.approx(5.0 - 0.001 * 10)  # fewer at the start
    with pytest.raises(ValueError, match="no validation at step 305"):
        bench.reference_loss(random_curve, 305)


def test_a_curve_reaches_the_reference_where_its_centred_mean_does(bench):
    # the low validation at 20 alone does not count (centred means 2.6 at 20, 2.2 at 30); at 40
    # the five validations 20-60 average 1.8, though its own is 3.0
    spiky = [(0, 3.0), (10, 3.0), (20, 1.0), (30, 3.0), (40, 3.0), (50, 1.0), (60, 1.0), (70, 1.0), (80, 1.0)]
    assert bench.steps_to_reach(spiky, 2.0) == 40
    assert bench.steps_to_reach(spiky, 0.5) is None


def test_seed_curves_average_per_step_over_the_steps_every_seed_validated(bench):
    first = {"loss": [(0, 3.0), (10, 2.0), (20, 1.0)], "VIF": [(0, 0.0), (10, 0.5), (20, 0.7)]}
    second = {"loss": [(0, 3.0), (10, 1.0)], "VIF": [(0, 0.0), (10, 0.7)]}
    assert bench.mean_curve([first, second]) == {"loss": [(0, 3.0), (10, 1.5)], "VIF": [(0, 0.0), (10, 0.6)]}
    assert bench.mean_curve([first]) == first


@pytest.mark.parametrize(("meta", "random", "multitask", "met"), [
    (10, 100, 20, (True, True)),
    (11, 100, 20, (False, True)),
    (10, 100, 10, (True, False)),
    (10, None, None, (True, True)),  # never reached: random counts its run's length, multitask loses
    (None, 100, None, (False, False)),
])
def test_target(bench, meta, random, multitask, met):
    verdict = bench.meets_target(meta, random, multitask, random_run=100)
    assert (verdict["meta_10x_fewer_than_random"], verdict["meta_fewer_than_multitask"]) == met


def stored_run(path: Path) -> Path:
    curves = {"meta": falling(2.0, 0.001, 200), "multitask": falling(2.2, 0.001, 200),
              "random": falling(6.0, 0.0045, 1000)}
    result = {"family": "multi_focus", "inits": {
        label: {"run_id": label, "steps": curve[-1][0], "curve": {"loss": curve, "VIF": curve, "Qabf": curve}}
        for label, curve in curves.items()}}
    payload = {"machine": "elsewhere", "workdir": "/nowhere", "results": [result],
               "args": {"random_steps": 1000, "out": str(path)}}
    path.write_text(json.dumps(payload))
    return path


def test_from_json_recomputes_every_reference_without_training(bench, tmp_path, capsys):
    path = stored_run(tmp_path / "meta.json")
    assert bench.main(["--from-json", str(path), "--reference-points", "200", "300"]) == 0
    payload = json.loads(path.read_text())
    result = payload["results"][0]
    assert payload["machine"] == "elsewhere"  # the runs' machine, not the one that re-reported
    assert set(result["reach"]) == {"200", "300", "1000"}
    random_curve = [tuple(point) for point in result["inits"]["random"]["curve"]["loss"]]
    for step, counts in result["reach"].items():
        assert counts["reference"] == pytest.approx(bench.reference_loss(random_curve, int(step)))
    assert result["reach"]["300"]["meta"] == 0  # meta starts at 2.0, below random's 300-step loss
    assert result["reach"]["1000"]["meta"] is None  # 1.8 after its 200 steps: above 1.59
    assert payload["targets"]["multi_focus"] == {"meta_10x_fewer_than_random": False,
                                                 "meta_fewer_than_multitask": False}
    assert (tmp_path / "meta.png").stat().st_size > 0
    assert "random's step" in capsys.readouterr().out
    # a run of one seed per init (and one stored before seeds) counts that seed alone
    assert result["inits"]["random"]["steps_to_random_final_per_seed"] == [result["inits"]["random"][
        "steps_to_random_final"]]


def test_each_seeds_steps_are_counted_against_the_mean_curves_reference(bench, tmp_path, capsys):
    path = stored_run(tmp_path / "meta.json")
    payload = json.loads(path.read_text())
    meta = payload["results"][0]["inits"]["meta"]
    fast, slow = falling(1.7, 0.001, 200), falling(2.3, 0.001, 200)  # mean: the stored 2.0 - 0.001 * step
    meta["seed_curves"] = [{metric: curve for metric in ("loss", "VIF", "Qabf")} for curve in (fast, slow)]
    path.write_text(json.dumps(payload))
    assert bench.main(["--from-json", str(path)]) == 0
    meta = json.loads(path.read_text())["results"][0]["inits"]["meta"]
    # random's 1000-step reference is about 1.59: the fast seed reaches it at 110, the slow one never
    assert meta["steps_to_random_final_per_seed"] == [110, None] and meta["steps_to_random_final"] is None
    assert "110 >200" in capsys.readouterr().out


def test_from_json_rejects_what_it_cannot_read(bench, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{\"results\": []}")
    assert bench.main(["--from-json", str(broken)]) == 2
    assert f"{broken}: expected a JSON written by benchmarks/meta.py" in capsys.readouterr().err
    path = stored_run(tmp_path / "meta.json")
    before = path.read_text()
    assert bench.main(["--from-json", str(path), "--reference-points", "205"]) == 2
    error = capsys.readouterr().err
    assert f"{path}: --reference-points [205]: expected steps random init validated at" in error
    assert path.read_text() == before  # nothing rewritten


def test_reference_points_random_init_does_not_validate_are_refused_before_training(bench):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--reference-points", "205", "--random-val-every", "10"])
    assert exit_info.value.code == 2


def test_a_run_trains_adapts_each_seed_and_reports_on_synthetic_data(bench, tmp_path, monkeypatch, capsys):
    """The benchmark end to end, at toy budgets: both learned inits are trained with the flags
    passed through, every init is adapted once per seed, and the tables, JSON and PNG follow."""
    import torch
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the benchmark changes into its workdir
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out, workdir = tmp_path / "meta.json", tmp_path / "work"
    assert bench.main(["--families", "multi_focus", "--data", "synthetic", "--algorithm", "reptile",
                       "--meta-steps", "2", "--cross-losses", "--adapt-steps", "10", "--random-steps", "20",
                       "--reference-points", "10", "--adapt-seeds", "2",
                       "--threads", str(torch.get_num_threads()),
                       "--out", str(out), "--workdir", str(workdir)]) == 0
    payload = json.loads(out.read_text())
    result = payload["results"][0]
    assert result["family"] == "multi_focus" and payload["args"]["cross_losses"] is True
    for label, steps in (("meta", 10), ("multitask", 10), ("random", 20)):
        entry = result["inits"][label]
        assert len(set(entry["run_ids"])) == 2 and len(entry["seed_curves"]) == 2
        assert entry["curve"]["loss"][-1][0] == steps and len(entry["steps_to_random_final_per_seed"]) == 2
    assert set(result["reach"]) == {"10", "20"}
    assert set(payload["targets"]["multi_focus"]) == {"meta_10x_fewer_than_random",
                                                     "meta_fewer_than_multitask"}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for run_id, algorithm in ((result["meta_run"], "reptile"), (result["multitask_run"], "multitask")):
        tags = client.get_run(run_id).data.tags
        assert (tags["cross_losses"], tags["loss_mixture"], tags["algorithm"]) == ("true", "0.0", algorithm)
    assert client.get_run(result["inits"]["meta"]["run_ids"][1]).data.params["train.seed"] == "1"
    assert out.with_suffix(".png").stat().st_size > 0
    assert "steps to random's final, per seed" in capsys.readouterr().out
