"""Fault drills on a real local multi-node Ray cluster (a head and two worker nodes, each its
own ``ray start``) with data, checkpoints and artifacts on a moto S3 endpoint on 127.0.0.1.

Every job runs as the real ``timfusion`` console script in its own process, so that a
driver can be SIGKILLed and a node lost without taking the test down with it. The node
loss drill is the one ``make test`` runs (it stays last: the node does not come back).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import default_store, free_port, metric_history, start_moto

SECRET = "timfusion-secret-that-is-never-logged-0123"
ACCESS = "AKIATIMFUSIONDRILL01"
QUICK_SEARCH = [
    "search_space=small", "data=synthetic", "data.synthetic.n=8", "data.synthetic.size=[48,48]", "crop=32",
    "batch_size=2", "search.cost_size=[32,32]", "search.warmup_steps=1", "tune.asha.enabled=false",
    "retrain.enabled=false", "report_every=2",
]
QUICK_TRAIN = [
    "data=synthetic", "data.synthetic.n=8", "data.synthetic.size=[64,64]", "genotype=tim_light",
    "train.crop=48", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=1", "guidance.weight=0",
]


@pytest.fixture(scope="module")
def drill_env(s3_endpoint):
    """The environment of the cluster and the drivers: the S3 endpoint and distinctive
    credentials (so that a leak into params, tags or logs is found)."""
    return {**os.environ, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled",
            "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def multinode(tmp_path_factory, drill_env):
    """A head (no CPUs: it schedules nothing) and two worker nodes of 2 CPUs: the state folder."""
    from timfusion.platform import local_cluster

    state = tmp_path_factory.mktemp("cluster")
    saved = dict(os.environ)
    os.environ.update(drill_env)  # the nodes' processes (trials, train workers) inherit it
    try:
        local_cluster.up(state, workers=2, cpus_per_worker=2)
        yield state
    finally:
        local_cluster.down(state)
        os.environ.clear()
        os.environ.update(saved)


def timfusion(*args: str, cwd: Path, env: dict) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "timfusion"
    return subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 420) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 480) -> None:
    """Poll until ``predicate()`` holds. The timeout only bounds a hung driver: on a loaded
    2-CPU machine the trials can take minutes to start, so it is no measure of speed."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.3)


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/checkpoint_*")) + sorted(folder.glob("checkpoint_*"))


def reported(experiment: Path) -> list[int]:
    """Per trial, how many results (each with its checkpoint) the Tune driver has recorded."""
    counts = []
    for result in experiment.glob("*/result.json"):
        try:
            counts.append(len(result.read_text().strip().splitlines()))
        except OSError:
            counts.append(0)
    return counts


def checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete training checkpoint under ``run_dir``."""
    import torch

    from timfusion.platform.training import STATE_FILE

    steps = [0]
    for folder in checkpoints(run_dir):
        try:
            steps.append(int(torch.load(folder / STATE_FILE, weights_only=False)["step"]))
        except (OSError, RuntimeError, EOFError):  # one being written or pruned right now
            pass
    return max(steps)


def logged_step(workdir: Path, run_name: str) -> int:
    """The newest step whose loss the training run ``run_name`` has logged (0 before any)."""
    if not (workdir / "runs" / "mlflow.db").exists():
        return 0
    runs = mlflow_runs(workdir, f"attributes.run_name = '{run_name}'")
    history = metric_history(default_store(workdir), runs[0].info.run_id, "loss/total") if runs else []
    return max((m.step for m in history), default=0)


def mlflow_runs(workdir: Path, filter_string: str, deleted: bool = False) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_store(workdir))
    experiment = client.get_experiment_by_name("timfusion")
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], filter_string, run_view_type=view)


def trial_runs(workdir: Path, search_run_id: str) -> list:
    return mlflow_runs(workdir, f"tags.parent_run_id = '{search_run_id}' and tags.job = 'search-trial'")


def search_run(workdir: Path, name: str):
    (run,) = mlflow_runs(workdir, f"tags.job = 'search' and attributes.run_name = '{name}'")
    return run


@pytest.mark.slow
def test_a_killed_driver_is_resumed_and_lists_every_trial_once(multinode, drill_env, tmp_path):
    args = ["search", "cluster=local_multinode", f"cluster.state_dir={multinode}", *QUICK_SEARCH, "trials=4",
            "steps=24", "cluster.max_concurrent_trials=2", "name=lost-driver"]
    driver = timfusion(*args, cwd=tmp_path, env=drill_env)
    experiment = tmp_path / "runs" / "ray" / "lost-driver"
    wait_for(lambda: sum(reported(experiment)) >= 3, driver, "checkpointed trial results")
    driver.send_signal(signal.SIGKILL)  # no handler runs: the search run stays RUNNING, trials die with it
    driver.wait(timeout=30)

    resumed = timfusion(*args, "resume=true", cwd=tmp_path, env=drill_env)
    output = finish(resumed)
    assert resumed.returncode == 0, output[-4000:]
    parent = search_run(tmp_path, "lost-driver")
    assert parent.info.status == "FINISHED"
    trials = trial_runs(tmp_path, parent.info.run_id)
    names = sorted(run.info.run_name for run in trials)
    # every trial once; attempts without a checkpoint gone
    assert len(names) == 4 and len(set(names)) == 4, names
    for run in trials:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in metric_history(default_store(tmp_path), run.info.run_id, "val_loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 24, (run.info.run_name, steps)
    results = json.loads((tmp_path / "outputs" / "search" / "lost-driver" / "trials.json").read_text())
    assert sorted(r["trial"] for r in results) == sorted({r["trial"] for r in results}) and len(results) == 4


@pytest.mark.slow
def test_a_killed_train_worker_resumes_from_the_last_checkpoint(multinode, drill_env, tmp_path):
    import psutil

    driver = timfusion("train", "cluster=local_multinode", f"cluster.state_dir={multinode}", *QUICK_TRAIN,
                       "cluster.num_workers=2", "train.steps=40", "train.checkpoint_every=5",
                       "name=lost-worker", cwd=tmp_path, env=drill_env)
    run_dir = tmp_path / "runs" / "ray" / "lost-worker"
    # a checkpoint on disk is the last one only once the controller has registered it: kill a
    # worker two logged steps after one appeared
    marks: dict[str, int] = {}

    def two_steps_past_a_checkpoint() -> bool:
        if "seen" not in marks:
            marks.update({"seen": checkpoint_step(run_dir)} if checkpoint_step(run_dir) else {})
            return False
        return logged_step(tmp_path, "lost-worker") >= marks["seen"] + 2

    wait_for(two_steps_past_a_checkpoint, driver, "a registered training checkpoint")
    seen = marks["seen"]
    victims = [p for p in psutil.process_iter(["cmdline"])
               if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no Ray Train worker process found"
    victims[-1].send_signal(signal.SIGKILL)
    output = finish(driver)
    assert driver.returncode == 0, output[-4000:]
    (run,) = mlflow_runs(tmp_path, "attributes.run_name = 'lost-worker'")
    store = default_store(tmp_path)
    restored = [m.value for m in metric_history(store, run.info.run_id, "restored_from_step")]
    assert restored and min(restored) >= max(5, seen), restored  # continued from a checkpoint, never from 0
    assert int(run.data.tags["final_step"]) == 40
    steps = [m.step for m in metric_history(store, run.info.run_id, "loss/total")]
    assert sorted(steps) == list(range(1, 41)), steps  # the replayed steps are not logged twice


@pytest.mark.slow
def test_everything_on_s3_and_no_credential_is_recorded(multinode, drill_env, s3_endpoint, tmp_path):
    import s3fs

    from timfusion.tasks.synthetic import synthesize

    fs = s3fs.S3FileSystem(key=ACCESS, secret=SECRET, client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("drill")
    synthesize("ir_vis", tmp_path / "data", n=6, seed=2, size=(64, 64))
    fs.put(str(tmp_path / "data"), "drill/data", recursive=True)
    driver = timfusion("train", "cluster=local_multinode", f"cluster.state_dir={multinode}", *QUICK_TRAIN[3:],
                       "data=root", "data.root=s3://drill/data", "cluster.storage_path=s3://drill/ray",
                       "tracking.artifact_root=s3://drill/mlflow", "tracking.experiment=on-s3",
                       "cluster.num_workers=2", "train.steps=6", "train.checkpoint_every=3", "name=on-s3",
                       cwd=tmp_path, env=drill_env)
    output = finish(driver)
    assert driver.returncode == 0, output[-4000:]
    assert fs.glob("drill/ray/on-s3/checkpoint_*"), fs.find("drill")
    assert fs.glob("drill/mlflow/**/model.pt"), fs.find("drill/mlflow")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(default_store(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name("on-s3").experiment_id])
    config = Path(client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path))).read_text()
    assert "s3://drill/ray" in config  # the storage is recorded, the credentials are not
    recorded = json.dumps([run.data.params, run.data.tags]) + output + config
    assert SECRET not in recorded and ACCESS not in recorded

    search = timfusion("search", "cluster=local_multinode", f"cluster.state_dir={multinode}", *QUICK_SEARCH,
                       "trials=2", "steps=4", "cluster.storage_path=s3://drill/ray", "name=search-on-s3",
                       cwd=tmp_path, env=drill_env)
    output = finish(search)
    assert search.returncode == 0, output[-4000:]
    assert len(fs.glob("drill/ray/search-on-s3/*/checkpoint_*")) == 2  # each trial's, through s3fs
    assert SECRET not in output and ACCESS not in output


@pytest.mark.slow
def test_s3_down_at_start_is_one_line_before_any_trial(tmp_path, drill_env):
    env = {**drill_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    started = time.time()
    done = subprocess.run([str(Path(sys.executable).parent / "timfusion"), "search", *QUICK_SEARCH,
                           "trials=2", "steps=4", "cluster.storage_path=s3://drill/ray", "name=no-s3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert (len(lines) == 1 and "cluster.storage_path=s3://drill/ray" in lines[0]
            and "not reachable" in lines[0])
    assert time.time() - started < 120
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # no search run, no trial started
    assert not (tmp_path / "runs" / "ray").exists()


@pytest.mark.slow
def test_s3_down_during_training_fails_clearly_and_records_nothing_complete(tmp_path, drill_env):
    proc, endpoint = start_moto(tmp_path / "moto.log")
    env = {**drill_env, "AWS_ENDPOINT_URL": endpoint}
    try:
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS, secret=SECRET, client_kwargs={"endpoint_url": endpoint},
                               skip_instance_cache=True)
        fs.mkdir("brief")
        driver = timfusion("train", *QUICK_TRAIN, "cluster.num_workers=1", "cluster.max_failures=1",
                           "cluster.num_cpus=2", "train.steps=400", "train.checkpoint_every=2",
                           "cluster.storage_path=s3://brief/ray", "name=s3-lost", cwd=tmp_path, env=env)
        wait_for(lambda: bool(fs.glob("brief/ray/s3-lost/checkpoint_*", refresh=True)), driver,
                 "a checkpoint on S3")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    output = finish(driver)
    assert driver.returncode == 1, output[-4000:]
    # Ray's forwarded worker logs may come after it: the job's own error is one line all the same
    errors = [line for line in output.splitlines() if line.startswith("timfusion train: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "timfusion train: error: training run s3-lost failed"), errors
    print(errors[0])
    (run,) = mlflow_runs(tmp_path, "attributes.run_name = 's3-lost'")
    assert run.info.status == "FAILED"
    assert "final_step" not in run.data.tags  # nothing recorded as complete
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(default_store(tmp_path)).list_artifacts(
        run.info.run_id, "model")


def test_a_lost_worker_node_resumes_its_trials_and_loses_no_result(multinode, drill_env, tmp_path):
    """Kill worker-1's raylet (a lost machine) while 4 trials run 2 per node: the search completes,
    the interrupted trials continue from their checkpoints on worker-2, finished results stay."""
    from timfusion.platform import local_cluster

    driver = timfusion("search", "cluster=local_multinode", f"cluster.state_dir={multinode}", *QUICK_SEARCH,
                       "trials=4", "steps=30", "cluster.max_concurrent_trials=4", "name=lost-node",
                       cwd=tmp_path, env=drill_env)
    experiment = tmp_path / "runs" / "ray" / "lost-node"
    wait_for(lambda: len(reported(experiment)) == 4 and min(reported(experiment)) >= 2, driver,
             "two checkpointed results of every trial")
    local_cluster.kill_node(multinode, "worker-1")
    output = finish(driver)
    assert driver.returncode == 0, output[-4000:]
    assert "worker-1" not in local_cluster.alive_nodes(local_cluster.ClusterState.read(multinode))
    parent = search_run(tmp_path, "lost-node")
    trials = trial_runs(tmp_path, parent.info.run_id)
    assert len(trials) == 4 and all(run.info.status == "FINISHED" for run in trials)
    store = default_store(tmp_path)
    restored = {run.info.run_name: [m.value for m in metric_history(store, run.info.run_id,
                                                                    "restored_from_step")]
                for run in trials}
    # from a checkpoint, not 0
    assert any(values and min(values) >= 2 for values in restored.values()), restored
    for run in trials:
        steps = [m.step for m in metric_history(store, run.info.run_id, "val_loss")]
        assert steps == sorted(set(steps)) and steps[-1] == 30, (run.info.run_name, steps)
    results = json.loads((tmp_path / "outputs" / "search" / "lost-node" / "trials.json").read_text())
    assert len(results) == 4 and all(r["steps"] == 30 for r in results)
