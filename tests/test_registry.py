"""The model registry on a real MLflow sqlite store: register, promote behind gates, fuse and
serve ``models:/`` URIs. (The remote tracking server with S3 artifacts: test_registry_server.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import default_store, free_port, model_run, run_cli, wait_for_http

from timfusion.platform.errors import UserError
from timfusion.tasks.imageio import read_image, write_image

NAME = "timfusion-ir_vis"


@pytest.fixture
def store(workdir) -> str:
    return default_store(workdir)


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 255, (40, 56))
    ir, vis = tmp_path / "ir.png", tmp_path / "vis.png"
    write_image(ir, np.clip(base + rng.normal(0, 20, base.shape), 0, 255))
    write_image(vis, np.clip(np.stack([base, base * 0.8, 255 - base], axis=-1), 0, 255))
    return ir, vis


def register(cli, store: str, run_id: str, name: str = NAME) -> int:
    code, out, err = cli("register", f"run={run_id}", f"name={name}", f"tracking.uri={store}")
    assert code == 0, err
    return int(out.split(" version ")[1].split()[0])


def promote(cli, store: str, version: int, *extra: str) -> tuple[int, str, str]:
    return cli("promote", f"name={NAME}", f"version={version}", f"tracking.uri={store}", *extra)


def client(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store)


def test_registered_version_is_a_checked_pyfunc_with_signature_requirements_and_lineage(cli, store, pair):
    import mlflow.pyfunc

    run_id = model_run(store)
    version = register(cli, store, run_id)
    assert version == 1
    info = client(store).get_model_version(NAME, "1")
    tags = info.tags
    assert tags["training_run_id"] == run_id and tags["dataset_fingerprint"] == "f00d"
    assert tags["task"] == "ir_vis" and tags["genotype"] == "compact" and "git_commit" in tags
    assert {"checksum.weights", "checksum.genotype", "checksum.task"} <= set(tags)
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert [spec.name for spec in model.metadata.get_input_schema().inputs] == ["a", "b"]
    from mlflow.artifacts import download_artifacts

    folder = Path(download_artifacts(artifact_uri=info.source, tracking_uri=store))
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==" in requirements and "timfusion==" in requirements
    assert (folder / "input_example.json").exists()
    ir, vis = (read_image(p, keep_rgb_gray=True) for p in pair)
    fused_8bit = model.predict({"a": ir.astype(np.uint8), "b": vis.astype(np.uint8)})
    fused_float = model.predict({"a": (ir / 255.0).astype(np.float32), "b": (vis / 255.0).astype(np.float32)})
    assert fused_8bit.shape == (40, 56, 3) and fused_8bit.dtype == np.uint8
    assert np.abs(fused_8bit.astype(int) - fused_float.astype(int)).max() <= 1
    gray = model.predict({"a": ir.astype(np.uint8), "b": ir[..., None].astype(np.uint8)})
    assert gray.shape == (40, 56, 1)


def test_fuse_with_a_models_uri_equals_the_run_it_came_from(cli, store, pair, tmp_path):
    run_id = model_run(store)
    register(cli, store, run_id)
    code, _, err = promote(cli, store, 1)
    assert code == 0, err
    outputs = {}
    for label, model in (("registry", f"models:/{NAME}@champion"), ("run", f"runs:/{run_id}"),
                         ("version", f"models:/{NAME}/1")):
        out = tmp_path / f"{label}.png"
        code, _, err = cli("fuse", f"model={model}", f"a={pair[0]}", f"b={pair[1]}", f"out={out}",
                           f"tracking.uri={store}")
        assert code == 0, err
        outputs[label] = read_image(out, keep_rgb_gray=True)
    assert (np.array_equal(outputs["registry"], outputs["run"])
            and np.array_equal(outputs["version"], outputs["run"]))


def test_promotion_gates_records_forces_and_rolls_back(cli, store):
    from timfusion.platform.tracking import Tracker

    good = register(cli, store, model_run(store))
    bad = register(cli, store, model_run(store, genotype="compact_regression", zero=True))
    code, out, err = promote(cli, store, good)
    assert code == 0, err
    assert "to @champion: promoted" in out and "no current holder" in out
    code, out, err = promote(cli, store, bad)
    assert code == 1 and "not promoted to @champion: refused" in err
    assert "FAIL" in out
    registry = client(store)
    assert int(registry.get_model_version_by_alias(NAME, "champion").version) == good
    tags = registry.get_model_version(NAME, str(bad)).tags
    assert tags["champion.decision"] == "refused" and tags["champion.holder_version"] == str(good)
    report_uri = tags["champion.report"]
    run_id, artifact = report_uri[len("runs:/"):].split("/", 1)
    report = Tracker(store, run_id).download(artifact, Path("report")).read_text()
    assert (report.startswith(f"# Promotion of {NAME} version {bad} to @champion: refused")
            and "| VIF" in report)

    code, _, err = promote(cli, store, bad, "force=true")
    assert code == 2 and 'reason="..."' in err
    code, out, err = promote(cli, store, bad, "force=true", "reason=hotfix for a demo")
    assert code == 0, err
    tags = registry.get_model_version(NAME, str(bad)).tags
    assert tags["champion.decision"] == "forced" and tags["champion.forced_reason"] == "hotfix for a demo"
    assert int(registry.get_model_version_by_alias(NAME, "champion").version) == bad

    # the rollback: the earlier version passes against the forced one
    code, out, err = promote(cli, store, good)
    assert code == 0, err
    assert int(registry.get_model_version_by_alias(NAME, "champion").version) == good
    assert registry.get_model_version(NAME, str(bad)).tags["champion.replaced_by"] == str(good)

    code, out, _ = cli("models", f"tracking.uri={store}")
    assert code == 0
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith(NAME)}
    assert "champion" in lines[str(good)] and "champion: promoted" in lines[str(good)]
    assert re.search(r"Qabf [0-9.]+, VIF [0-9.]+", lines[str(good)])  # the gate's numbers, as key metrics
    assert "champion: forced" in lines[str(bad)]


def test_a_corrupted_artifact_is_never_loaded_nor_promoted(cli, store):
    from timfusion.platform.model_registry import load_registered

    version = register(cli, store, model_run(store))
    weights = next(Path("runs").rglob("registry/pyfunc/artifacts/weights.pt"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(UserError, match="checksum of weights.pt"):
        load_registered(f"models:/{NAME}/{version}", store)
    code, _, err = promote(cli, store, version, "force=true", "reason=try anyway")
    assert code == 1 and "does not load" in err
    registry = client(store)
    assert (registry.get_model_version(NAME, str(version)).tags["champion.decision"]
            == "refused (does not load)")
    assert not registry.get_registered_model(NAME).aliases


def test_a_gate_on_a_dataset_that_does_not_exist_fails_before_any_evaluation(cli, store):
    version = register(cli, store, model_run(store))
    code, _, err = promote(cli, store, version, "gate.dataset=no_such_set")
    assert code == 2 and "gate.dataset=no_such_set: not 'synthetic', a dataset of task ir_vis" in err
    code, _, err = promote(cli, store, version, "+gate.metrics.NOPE=0.1")
    assert code == 2 and "NOPE" in err
    for override, expected in (
        ("gate.max_macs=-5", "gate.max_macs must be > 0 or null, got -5"),
        ("gate.size=[96]", "gate.size: expected [height, width] of integers >= 1, got [96]"),
        ("gate.synthetic.size=[8,8]",
         "gate.synthetic.size: expected [height, width] of integers >= 16, got [8, 8]"),
    ):
        code, _, err = promote(cli, store, version, override)
        assert code == 2 and expected in err, err
    assert "champion.decision" not in client(store).get_model_version(NAME, str(version)).tags
    code, _, err = promote(cli, store, 7)
    assert code == 2 and "version 7: not in the registry" in err


def test_two_concurrent_promotions_end_with_a_champion_that_passed_and_both_recorded(cli, store, workdir):
    versions = [register(cli, store, model_run(store, seed=seed)) for seed in (0, 1)]
    exe = str(Path(sys.executable).parent / "timfusion")
    procs = [subprocess.Popen([exe, "promote", f"name={NAME}", f"version={v}", f"tracking.uri={store}"],
                              cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in versions]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode in (0, 1) for proc in procs), results
    registry = client(store)
    champion = registry.get_model_version_by_alias(NAME, "champion")
    decisions = {v: registry.get_model_version(NAME, str(v)).tags["champion.decision"] for v in versions}
    assert decisions[int(champion.version)] == "promoted"
    assert set(decisions.values()) <= {"promoted", "refused"}
    holders = {v: registry.get_model_version(NAME, str(v)).tags["champion.holder_version"] for v in versions}
    first = [v for v in versions if holders[v] == "none"]  # one ran first, under the store's lock,
    assert len(first) == 1  # and the other was judged against it
    assert holders[next(v for v in versions if v != first[0])] == str(first[0])


def test_register_true_at_the_end_of_training_and_meta_init_naming(workdir, store):
    from timfusion.platform.config import compose
    from timfusion.platform.jobs.train import train

    result = train(compose("train", [
        "data=synthetic", "data.synthetic.n=6", "data.synthetic.size=[48,48]", "genotype=compact",
        "cluster=none", "train.steps=2", "train.crop=32", "train.batch_size=2", "guidance.weight=0",
        "register=true", f"tracking.uri={store}",
    ]))
    assert result["registered"]["name"] == NAME and result["registered"]["version"] == 1
    from timfusion.platform.model_registry import default_name

    assert default_name(None) == "timfusion-meta-init"


def test_mlflow_models_serve_answers_with_the_fuse_commands_image(cli, store, pair, tmp_path, workdir):
    import os
    import urllib.request

    run_id = model_run(store)
    register(cli, store, run_id)
    code, _, err = promote(cli, store, 1)
    assert code == 0, err
    expected_path = tmp_path / "expected.png"
    code, _, err = cli("fuse", f"model=models:/{NAME}@champion", f"a={pair[0]}", f"b={pair[1]}",
                       f"out={expected_path}", f"tracking.uri={store}")
    assert code == 0, err
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs uvicorn from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m",
                               f"models:/{NAME}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], cwd=workdir, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log")
        ir, vis = (read_image(p, keep_rgb_gray=True).astype(np.uint8) for p in pair)
        body = json.dumps({"inputs": {"a": ir.tolist(), "b": vis.tolist()}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.uint8)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    assert np.array_equal(served, read_image(expected_path, keep_rgb_gray=True).astype(np.uint8))


def test_bad_register_inputs_are_one_line_errors(workdir, store):
    run_id = model_run(store)
    result = run_cli("register", "run=0123456789abcdef0123456789abcdef", f"tracking.uri={store}", cwd=workdir)
    assert (result.returncode == 2 and "not found" in result.stderr
            and len(result.stderr.strip().splitlines()) == 1)
    result = run_cli("register", f"run={run_id}", "name=bad name!", f"tracking.uri={store}", cwd=workdir)
    assert result.returncode == 2 and "name=bad name!" in result.stderr
