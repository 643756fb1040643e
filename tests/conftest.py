"""Fixtures shared by the tests: CLI runner, synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cli(capsys):
    """Run ``timfusion`` in-process: returns (exit code, stdout, stderr)."""
    from timfusion.platform.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def synthetic_ir_vis(tmp_path_factory) -> Path:
    """A small synthetic IR/VIS set in the manifest format, made once per session."""
    from timfusion.tasks.synthetic import synthesize

    out = tmp_path_factory.mktemp("synth_ir_vis")
    synthesize("ir_vis", out, n=6, seed=3, size=(64, 96))
    return out


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster (4 logical CPUs) for one test module, its session files in a temp folder."""
    import os

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The test's working directory (runs/, outputs/ land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """One torch thread and seed 0 for the test (restored after): small CPU models, same numbers."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible endpoint (moto's server) on 127.0.0.1 with test credentials in the
    environment: its URL."""
    import os

    from helpers import start_moto

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    saved = {k: os.environ.get(k)
             for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto(log)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
