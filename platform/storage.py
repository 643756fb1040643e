"""Where data, checkpoints and artifacts live: local folders or S3 (any fsspec URL).

Credentials come from the standard AWS environment variables or profiles (and
``AWS_ENDPOINT_URL`` for an S3-compatible endpoint); they are never part of a config.
``redact`` keeps them out of params, tags, logged text and error lines all the same, for a
URL that carries them inline. ``check_reachable`` runs before a job starts anything, so an
unreachable endpoint is one clear line instead of a trial or worker failing later.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from timfusion.platform.errors import UserError
from timfusion.tasks.imageio import is_url

CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_INLINE = [
    re.compile(r"(?i)((?:access_key|secret_key|session_token|secret|password|token)=)[^&\s'\"]+"),
    re.compile(r"(://)[^/@\s:'\"]+:[^/@\s'\"]+@"),  # scheme://user:secret@host
]


def storage_root(path: str | os.PathLike) -> str:
    """A storage location as Ray and fsspec take it: URLs as they are, local paths absolute."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def ray_storage(path: str | os.PathLike) -> tuple[str, Any | None]:
    """Ray's ``storage_path`` and ``storage_filesystem`` for a location: a local path as it is;
    ``s3://`` through s3fs, so that checkpoints take the same endpoint and credentials as the
    data and the artifacts (the filesystem travels to every node without keys in it)."""
    if not str(path).startswith(("s3://", "s3a://")):
        return storage_root(path), None
    import pyarrow.fs

    filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3_filesystem()))
    return str(path).split("://", 1)[1].rstrip("/"), filesystem


def job_storage(cfg: DictConfig) -> str:
    """The job's checkpoint storage (``storage_root`` of ``cluster.storage_path``), once every
    remote location it will write or read answers (that path, ``tracking.artifact_root``,
    ``data.root``): checked before the job starts Ray or an MLflow run."""
    places = {"cluster.storage_path": OmegaConf.select(cfg, "cluster.storage_path"),
              "tracking.artifact_root": OmegaConf.select(cfg, "tracking.artifact_root")}
    if OmegaConf.select(cfg, "data.source") == "root":
        places["data.root"] = OmegaConf.select(cfg, "data.root")
    for key, url in places.items():
        if url:
            check_reachable(str(url), key)
    return storage_root(cfg.cluster.storage_path)


def s3_endpoint() -> str | None:
    """The S3-compatible endpoint the environment names (``AWS_ENDPOINT_URL[_S3]``), else None (AWS)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(**options: Any):
    """An s3fs filesystem on the environment's endpoint and credentials (``options``: s3fs's)."""
    import s3fs

    endpoint = s3_endpoint()
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {}, **options)


def redact(text: str) -> str:
    """``text`` without credentials: inline URL secrets and the values of the AWS variables."""
    for pattern in _INLINE:
        text = pattern.sub(lambda m: m.group(1) + ("***@" if m.group(1) == "://" else "***"), text)
    for variable in CREDENTIAL_VARIABLES:
        value = os.environ.get(variable)
        if value and len(value) >= 12:  # real keys are 20 and 40 characters; short test values stay
            text = text.replace(value, "***")
    return text


def check_reachable(url: str, key: str, timeout_s: float = 5.0) -> None:
    """Fail with one line naming ``key`` when the storage behind ``url`` cannot be reached
    (endpoint down, bucket missing, credentials refused); local paths always pass."""
    if not str(url).startswith(("s3://", "s3a://")):
        return
    bucket = str(url).split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    endpoint = s3_endpoint()
    fs = s3_filesystem(skip_instance_cache=True, config_kwargs={
        "connect_timeout": timeout_s, "read_timeout": timeout_s, "retries": {"max_attempts": 1}})
    where = f" at {endpoint}" if endpoint else ""
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise UserError(f"{key}={redact(url)}: bucket {bucket!r} does not exist{where}") from None
    except PermissionError as err:
        raise UserError(f"{key}={redact(url)}: access to bucket {bucket!r} refused{where} ({err})") from None
    except Exception as err:  # botocore's connection errors, timeouts, bad endpoints
        raise UserError(
            f"{key}={redact(url)}: S3 endpoint{where or ' (AWS)'} not reachable "
            f"({type(err).__name__}: {redact(str(err)).splitlines()[0] if str(err) else 'no answer'})"
        ) from None
