"""The registry against a remote tracking server: ``mlflow server`` with a sqlite backend and
its artifact store on a moto S3 endpoint, both on 127.0.0.1, started by fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, model_run, wait_for_http

from timfusion.tasks.imageio import read_image, write_image

NAME = "timfusion-ir_vis"
BUCKET = "timfusion-registry"


@pytest.fixture(scope="module")
def server(s3_endpoint, tmp_path_factory):
    """``mlflow server`` proxying artifacts to ``s3://BUCKET/mlflow``: its URL."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    log = folder / "server.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=folder, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_register_promote_and_fuse_through_a_tracking_server_with_s3_artifacts(server, s3_endpoint, cli,
                                                                                workdir, tmp_path):
    import boto3

    run_id = model_run(server)
    code, out, err = cli("register", f"run={run_id}", f"name={NAME}", f"tracking.uri={server}")
    assert code == 0, err
    code, out, err = cli("promote", f"name={NAME}", "version=1", f"tracking.uri={server}")
    assert code == 0 and "to @champion: promoted" in out, err
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=BUCKET, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("registry/pyfunc/artifacts/weights.pt") for k in keys), keys
    assert any("registry/promotions/champion-v1-" in k for k in keys), keys
    rng = np.random.default_rng(2)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    write_image(a, rng.uniform(0, 255, (32, 48)))
    write_image(b, rng.uniform(0, 255, (32, 48)))
    fused = {}
    for label, model in (("registry", f"models:/{NAME}@champion"), ("run", f"runs:/{run_id}")):
        out_path = tmp_path / f"{label}.png"
        code, _, err = cli("fuse", f"model={model}", f"a={a}", f"b={b}", f"out={out_path}",
                           f"tracking.uri={server}")
        assert code == 0, err
        fused[label] = read_image(out_path)
    assert np.array_equal(fused["registry"], fused["run"])
    code, out, _ = cli("models", f"tracking.uri={server}")
    assert code == 0 and "champion" in out
