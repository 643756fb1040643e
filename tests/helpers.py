"""Helpers shared by the tests: where the real data is, and how to run the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))
# What numpy says when a step asks this machine for too much; the tests that run out of memory
# raise it rather than make the allocation (where memory is overcommitted that would succeed and
# the OOM killer would end the tests)
STARVED = "Unable to allocate 37.3 GiB for an array with shape (100000, 100000)"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/NAME.py`` as a module (benchmarks are scripts, not a package)."""
    path = REPO / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"timfusion_{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need_shared(*parts: str) -> Path:
    """The path under ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set TIMFUSION_SHARED to the shared data folder)")
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess (exit codes, stderr, no state leaks)."""
    exe = Path(sys.executable).parent / "timfusion"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def default_store(workdir: Path) -> str:
    """The MLflow tracking URI a job run from ``workdir`` with the default config writes to."""
    return f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"


def metric_history(tracking_uri: str, run_id: str, key: str) -> list:
    """The MLflow history of metric ``key`` in run ``run_id``."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_metric_history(run_id, key)


def job_metric_history(result: dict, key: str) -> list:
    """The MLflow history of metric ``key`` in a job's run (``result`` as the job returned it)."""
    return metric_history(result["tracking_uri"], result["run_id"], key)


def job_tags(result: dict) -> dict[str, str]:
    """The MLflow tags of a job's run (``result`` as the job returned it)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.tags


def model_run(uri: str, genotype: str = "compact", seed: int = 0, zero: bool = False,
              task: str = "ir_vis") -> str:
    """A finished MLflow run holding ``model/model.pt`` as training logs it (seeded weights; ``zero``:
    every weight 0, a network that fuses to a constant image)."""
    import tempfile

    import torch

    from timfusion.platform.config import task_config
    from timfusion.platform.tracking import Tracker
    from timfusion.search_spaces.network import FusionNetwork, save_model

    torch.manual_seed(seed)
    network = FusionNetwork(genotype)
    if zero:
        with torch.no_grad():
            for param in network.parameters():
                param.zero_()
    tracker = Tracker.start({"uri": uri, "experiment": "timfusion"}, f"train-{genotype}-{seed}",
                            {"job": "train", "task": task, "genotype": genotype,
                             "dataset_fingerprint": "f00d"})
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        save_model(path, network, network.genotype, task_config(task))
        tracker.log_artifact(path, "model")
    tracker.finish()
    return tracker.run_id

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    from timfusion.platform.local_cluster import free_ports

    return free_ports(1)[0]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on 127.0.0.1 (credentials ``test``/``test`` expected in the environment):
    the process and its endpoint URL, once it answers."""
    port = free_port()
    with open(log, "w") as handle:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                                 "-p", str(port)],
                                stdout=handle, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint, proc, log)
    return proc, endpoint


def wait_for_http(url: str, proc, log: Path, timeout: float = 120.0) -> None:
    """Poll ``url`` until it answers; a server that exits or stays silent fails with its log."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers, if not with 200
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)

