"""Task-guided training on a real local Ray cluster, tracked in a real MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import STARVED, default_store, job_metric_history, job_tags

from timfusion.platform.config import compose
from timfusion.platform.errors import UserError
from timfusion.platform.jobs.train import train

QUICK = [
    "data=synthetic", "data.synthetic.n=8", "data.synthetic.size=[64,64]", "genotype=tim_light",
    "train.crop=48", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1",
    "guidance.warmup_steps=1",
]


def run_train(*overrides: str) -> dict:
    return train(compose("train", [*QUICK, *overrides]))


def final_step(result: dict) -> int:
    return int(job_tags(result)["final_step"])


def metric_steps(result: dict, key: str) -> list[int]:
    return sorted(m.step for m in job_metric_history(result, key))


def test_two_workers_log_everything_and_checkpoint(ray_cluster, workdir):
    from mlflow.tracking import MlflowClient

    result = run_train("cluster=local", "cluster.num_workers=2", "train.steps=4", "train.checkpoint_every=2",
                       "guidance.weight=0.1", "name=guided")
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["task.name"] == "ir_vis" and run.data.params["train.steps"] == "4"
    assert run.data.tags["task"] == "ir_vis" and len(run.data.tags["dataset_fingerprint"]) == 16
    assert run.data.tags["git_commit"]
    assert ("val/mIoU" in run.data.metrics and "val/Qabf" in run.data.metrics
            and run.data.metrics["val/loss"] > 0)
    assert metric_steps(result, "loss/total") == [1, 2, 3, 4]
    artifacts = {a.path for folder in ("", "model", "config", "genotype", "validation", "data")
                 for a in client.list_artifacts(result["run_id"], folder or None)}
    assert {"model/model.pt", "config/config.yaml", "genotype/genotype.json", "data/split.json"} <= artifacts
    assert any(path.startswith("validation/") and path.endswith(".png") for path in artifacts)
    checkpoints = list((workdir / "runs" / "ray" / "guided").glob("checkpoint_*"))
    assert checkpoints


def test_unguided_training_logs_no_miou_and_fuses(ray_cluster, workdir, cli):
    result = run_train("cluster.num_workers=1", "train.steps=2", "guidance.weight=0", "name=plain")
    assert "val/mIoU" not in result["metrics"] and "loss/head" not in result["metrics"]
    data = next((workdir / "outputs" / "train").glob("synthetic_*"))
    code, _, err = cli("fuse", f"model=runs:/{result['run_id']}", f"data.root={data}",
                       f"out={workdir / 'fused'}")
    assert code == 0, err
    assert len(list((workdir / "fused").glob("*.png"))) == 8


@pytest.mark.slow  # the drill with a worker killed from outside: tests/test_faults.py
def test_killed_worker_is_retried_and_training_completes(ray_cluster, workdir):
    result = run_train("cluster.num_workers=2", "train.steps=6", "train.checkpoint_every=2",
                       "faults.kill_worker_at_step=3", "cluster.max_failures=2", "name=faulty",
                       "guidance.weight=0")
    assert (workdir / "runs" / "ray" / "faulty" / ".fault_injected").exists()
    assert final_step(result) == 6
    steps = metric_steps(result, "loss/total")
    assert steps[-1] == 6 and 5 in steps


def test_resume_continues_the_step_counter(ray_cluster, workdir):
    first = run_train("cluster.num_workers=1", "train.steps=4", "train.checkpoint_every=2", "name=resumable",
                      "guidance.weight=0")
    with pytest.raises(UserError, match="pass resume=true"):
        run_train("cluster.num_workers=1", "train.steps=8", "name=resumable")
    # the checkpoints' shapes come from the genotype and task: another one is refused before Ray
    with pytest.raises(UserError, match="name=resumable: genotype is compact where the run has tim_light"):
        run_train("cluster.num_workers=1", "name=resumable", "resume=true", "genotype=compact")
    second = run_train("cluster.num_workers=1", "train.steps=8", "train.checkpoint_every=2", "name=resumable",
                       "resume=true", "guidance.weight=0")
    assert second["run_id"] == first["run_id"]
    steps = metric_steps(second, "loss/total")
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8], steps  # continued from step 4, never restarted at 1
    info = json.loads((workdir / "runs" / "ray" / "resumable" / "timfusion_run.json").read_text())
    assert info["mlflow_run_id"] == first["run_id"]


def test_resume_of_unknown_run_is_refused(workdir):
    with pytest.raises(UserError, match="no run 'ghost'"):
        run_train("name=ghost", "resume=true")


def test_main_job_trains_fuses_and_ranks_the_network_beside_the_baselines(ray_cluster, workdir, capsys):
    from mlflow.tracking import MlflowClient

    from timfusion.platform.jobs.run import run

    result = run(compose("run", [
        f"workdir={workdir / 'main'}", "n=3", "size=[64,80]", "baselines=[average,gff]",
        "metrics=[EN,MI,Qabf]", "train.steps=3", "train.n=6", "train.size=[64,64]", "train.workers=1",
        "train.time_budget_s=120", "search.steps=4", "meta.steps=2", "meta.n=4", "meta.size=[48,48]",
        "meta.crop=32", "meta.adapt_steps=4", "meta.val_every=2", "meta.workers=1", "meta.meta_batch=2",
    ]))
    ranks = (workdir / "main" / "evaluate" / "ranks.md").read_text()
    assert "timfusion_compact" in ranks and "gff" in ranks and "average" in ranks
    assert "timfusion_searched" in ranks and len(result["search"]["rows"]) == 2
    assert (workdir / "main" / "search" / result["search"]["name"] / "genotype.json").exists()
    assert len(list((workdir / "main" / "fused" / "timfusion_compact").glob("*.png"))) == 3
    trained = result["train"]
    assert trained["tracking_uri"] == default_store(workdir / "main")
    run_info = MlflowClient(trained["tracking_uri"]).get_run(trained["run_id"])
    assert run_info.info.status == "FINISHED" and run_info.data.tags["final_step"] == "3"
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "adaptation to multi_focus" in out
    assert (sorted(result["meta"]["curves"]["meta-init"]) == [2, 4]
            == sorted(result["meta"]["curves"]["random init"]))


def test_unknown_op_lists_known_ops(workdir):
    bad = workdir / "bad.json"
    genotype = json.loads(compose("train", []).get("genotype") and
                          open(__import__("timfusion.search_spaces.genotype", fromlist=["x"])
                               .__file__.replace("genotype.py", "genotypes/tim_light.json")).read())
    genotype["stage1"]["cells"][0]["ops"][0] = "warp_drive"
    bad.write_text(json.dumps(genotype))
    with pytest.raises(UserError, match=r"unknown operation 'warp_drive'; known: .*sep_conv_3x3"):
        run_train(f"genotype={bad}")
    assert not (workdir / "runs").exists()  # failed before any run was created


def test_local_backend_without_ray(workdir):
    result = run_train("cluster=none", "train.steps=3", "train.checkpoint_every=2", "name=debug",
                       "guidance.weight=0")
    assert final_step(result) == 3
    assert sorted(p.name for p in (workdir / "runs" / "ray" / "debug").glob("checkpoint_*")) == [
        "checkpoint_000000002", "checkpoint_000000003"]


def test_a_resumed_run_is_compared_on_what_both_sides_record():
    from timfusion.platform.jobs.train import check_resumed

    info = {"identity": {"task": "ir_vis", "genotype": {"name": "compact", "cells": [1, 2]},
                         "guidance.head_width": None}}
    check_resumed(info, {"task": "ir_vis", "genotype": {"name": "compact", "cells": (1, 2)},
                         "guidance.head_width": 8}, "r")  # tuples as lists; an unguided run had no head
    check_resumed({"mlflow_run_id": "x"}, {"task": "medical"}, "r")  # recorded before identities were
    with pytest.raises(UserError, match=r"task is medical where the run has ir_vis; genotype is compact wh"):
        check_resumed(info, {"task": "medical", "genotype": {"name": "compact", "cells": [1, 3]}}, "r")


OUT_OF_MEMORY_LINE = (r"run hungry: out of memory \(MemoryError: Unable to allocate 37.3 GiB.*\); "
                      r"lower train.crop or train.batch_size")


def starve_training(monkeypatch, attempts: Path) -> None:
    """Training's worker loop replaced by one that logs its start to ``attempts`` and runs out of
    memory (``helpers.STARVED``)."""
    from timfusion.platform.jobs import train as job

    def starved(config: dict) -> None:
        with attempts.open("a") as log:
            log.write("started\n")
        raise MemoryError(STARVED)

    monkeypatch.setattr(job, "train_worker", starved)


def test_running_out_of_memory_is_one_line_naming_the_knobs(workdir, monkeypatch):
    """A patch or batch too large for this machine (train.crop=100000 asks numpy for 37 GiB): the
    run is marked FAILED and the line says what to lower."""
    from mlflow.tracking import MlflowClient

    from timfusion.platform.errors import JobFailed

    starve_training(monkeypatch, workdir / "attempts.txt")
    with pytest.raises(JobFailed, match=OUT_OF_MEMORY_LINE):
        run_train("cluster=none", "name=hungry", "train.steps=2")
    client = MlflowClient(f"sqlite:///{workdir / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "FAILED"


def test_running_out_of_memory_on_ray_spends_no_restart(ray_cluster, workdir, monkeypatch):
    """On Ray Train the same error ends the run at its first attempt: a restart would run the same
    step on the same machine and run out again, after minutes spent on each of max_failures."""
    from timfusion.platform.errors import JobFailed

    attempts = workdir / "attempts.txt"
    starve_training(monkeypatch, attempts)
    with pytest.raises(JobFailed, match=OUT_OF_MEMORY_LINE):
        run_train("cluster.num_workers=1", "cluster.max_failures=2", "name=hungry", "train.steps=2")
    assert attempts.read_text().splitlines() == ["started"]
