"""MLflow tracking: one run per job, params from the resolved config, metrics, artifacts, lineage tags.

``Tracker`` wraps ``MlflowClient`` for one run, so the driver and the rank-0 training
worker (another process) log to the same run by id without global MLflow state.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from timfusion.platform.config import ROOT, flatten
from timfusion.platform.errors import UserError
from timfusion.platform.storage import redact

MAX_PARAM_LENGTH = 6000


def default_store() -> Path:
    return Path.cwd() / "runs"


# MLflow's own tracking stores (a database URI may name its driver: postgresql+psycopg2://)
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                    "uc")


def tracking_uri(configured: str | None) -> str:
    """The tracking URI: configured (checked: one line now, not MLflow's traceback at the first
    run), else ``sqlite:///<cwd>/runs/mlflow.db``."""
    if configured:
        shown = redact(str(configured))
        scheme = urlparse(str(configured)).scheme.split("+")[0]
        if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise UserError(f"tracking.uri={shown}: MLflow 3 opens a folder store only with "
                            "MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///PATH (the default) or a server")
        if scheme not in ("", "file", *TRACKING_SCHEMES):
            raise UserError(f"tracking.uri={shown}: MLflow has no store for {scheme}://; expected "
                            "sqlite:///PATH, http(s)://SERVER or a database URI")
        return str(configured)
    store = default_store()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def git_commit() -> str:
    """The project's git commit (with ``-dirty`` for uncommitted changes), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def mlflow_client(uri: str):
    """An ``MlflowClient`` for ``uri`` (telemetry off)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created (with its artifact location) if needed."""
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = artifact_root
    if location is None and uri.startswith("sqlite:"):
        location = (default_store() / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class Tracker:
    """Logging into one MLflow run (by id), from any process."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.client = mlflow_client(uri)

    @classmethod
    def start(
        cls,
        tracking: dict[str, Any],
        run_name: str,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ) -> Tracker:
        """Create a run in the configured experiment, tagged with the git commit (and parent)."""
        uri = tracking_uri(tracking.get("uri"))
        experiment_id = ensure_experiment(uri, tracking.get("experiment") or "timfusion",
                                          tracking.get("artifact_root"))
        all_tags = {"git_commit": git_commit(), "mlflow.runName": run_name, **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
            all_tags["parent_run_id"] = parent_run_id
        all_tags = {key: redact(str(value)) for key, value in all_tags.items()}
        run = mlflow_client(uri).create_run(experiment_id, run_name=run_name, tags=all_tags)
        return cls(uri, run.info.run_id)

    def log_config(self, config: dict[str, Any]) -> None:
        """The flattened resolved config as params (long values truncated, as MLflow limits them)."""
        from mlflow.entities import Param

        params = [Param(k, redact(str(v))[:MAX_PARAM_LENGTH]) for k, v in flatten(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def restored(self, step: int, key: str) -> int:
        """Record that the run continues from a checkpoint at ``step`` (a lost worker or node,
        resume=true) and return the highest step at which ``key`` was already logged: the run
        replays the steps after its checkpoint, and does not log those a second time."""
        self.log_metrics({"restored_from_step": step}, step=step)
        return max((metric.step for metric in self.client.get_metric_history(self.run_id, key)), default=-1)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, redact(str(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """Log in-memory content as the artifact ``artifact_file`` (``dir/name.ext``)."""
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.log_bytes(redact(text).encode("utf-8"), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))


def resolve_run(uri: str, run_id: str) -> Any:
    """The MLflow run ``run_id``; an unknown id is a UserError."""
    try:
        return mlflow_client(uri).get_run(run_id)
    except Exception as err:  # mlflow raises MlflowException with RESOURCE_DOES_NOT_EXIST
        raise UserError(f"run {run_id}: not found in {uri} ({err.__class__.__name__})") from None
