"""``timfusion register``, ``promote`` and ``models``: the model registry from the command line
(library code in :mod:`timfusion.platform.model_registry`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from timfusion.platform.config import to_container
from timfusion.platform.errors import check_bounds
from timfusion.platform.jobs import command
from timfusion.platform.report import text_table


@command("register", config="register",
         summary="register a run's model as a pyfunc version (timfusion-<task>)")
def register(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.platform.model_registry import default_name, register_run
    from timfusion.platform.tracking import resolve_run, tracking_uri

    uri = tracking_uri(cfg.tracking.uri)
    run = resolve_run(uri, str(cfg.run))
    task = None if run.data.tags.get("job") == "meta" else run.data.tags.get("task")
    return register_run(str(cfg.run), str(cfg.name or default_name(task)), uri, str(cfg.description))


def check_register(cfg: DictConfig) -> None:
    """``register=true``'s ``register_name``, checked before the job's work rather than after it."""
    if cfg.get("register") and cfg.get("register_name"):
        from timfusion.platform.model_registry import check_model_name

        check_model_name(str(cfg.register_name), key="register_name")


def register_after(cfg: DictConfig, result: dict[str, Any], run_id: str,
                   task_name: str | None) -> dict[str, Any]:
    """``register=true`` at the end of train, adapt, search and meta: ``run_id``'s model is
    registered and the job's ``result`` gains ``registered``."""
    if cfg.get("register"):
        from timfusion.platform.model_registry import default_name, register_run

        name = str(cfg.get("register_name") or default_name(task_name))
        result["registered"] = register_run(run_id, name, cfg.tracking.uri)
    return result


@command("promote", config="promote",
         summary="move an alias (champion) to a version that passes a quality gate")
def promote(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.platform.model_registry import Gate
    from timfusion.platform.model_registry import promote as promote_version

    check_bounds("", cfg, at_least_one=("version",))
    gate = Gate.from_config(to_container(cfg.gate))
    return promote_version(
        str(cfg.name), int(cfg.version), str(cfg.alias), gate, cfg.tracking.uri,
        Path(str(cfg.workdir)).resolve(), cfg.paths.shared, bool(cfg.force), str(cfg.reason or ""),
    )


@command("models", config="models", summary="list registered models, versions, aliases and decisions")
def models(cfg: DictConfig) -> list[dict[str, Any]]:
    from timfusion.platform.model_registry import list_models

    rows = list_models(cfg.tracking.uri, cfg.name)
    if rows:
        print(text_table(rows, list(rows[0])))
    else:
        print("no registered models")
    return rows
