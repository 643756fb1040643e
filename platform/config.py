"""Configuration: Hydra composition over config groups kept next to the code they configure.

The primary configs (one per command) live in ``platform/conf``; group folders are
found on a search path: ``tasks/conf`` (``task=``), ``clusters`` (``cluster=``) and the
other areas' ``conf`` folders as they appear. Composition errors (an unknown group value,
an unknown key, a malformed override) become one-line ``UserError``s that list the valid
choices, before any work starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import timfusion
from timfusion.platform.errors import UserError

ROOT = Path(timfusion.__file__).resolve().parent
PRIMARY_DIR = ROOT / "platform" / "conf"
SEARCH_DIRS = [ROOT / "tasks" / "conf", ROOT / "clusters" / "conf", ROOT / "search_spaces" / "conf",
               ROOT / "meta" / "conf"]


def _search_path() -> list[str]:
    return [f"file://{path}" for path in SEARCH_DIRS if path.is_dir()]


def group_options(group: str) -> list[str]:
    """The values a config group (``task``, ``cluster``, ...) can take."""
    names: set[str] = set()
    for base in [PRIMARY_DIR, *SEARCH_DIRS]:
        folder = base / group
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def _top_keys(config_name: str) -> list[str]:
    try:
        return sorted(str(k) for k in compose(config_name, []).keys())
    except UserError:
        return []


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose the command config ``config_name`` with Hydra ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    GlobalHydra.instance().clear()
    searchpath = "hydra.searchpath=[" + ",".join(_search_path()) + "]"
    try:
        with initialize_config_dir(config_dir=str(PRIMARY_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=[searchpath, *overrides])
    except MissingConfigException as err:
        text = str(err)
        group = re.search(r"Could not find '([^/']+)/([^']+)'", text)
        if group:
            raise UserError(
                f"{group.group(1)}={group.group(2)}: unknown value; valid choices: "
                f"{', '.join(group_options(group.group(1)))}"
            ) from None
        raise UserError(text.splitlines()[0]) from None
    except OverrideParseException as err:
        raise UserError(f"malformed override: {str(err).splitlines()[0]}") from None
    except ConfigCompositionException as err:
        text = str(err)
        key = (re.search(r"Could not override '([^']+)'", text)
               or re.search(r"Key '([^']+)' is not in struct", text))
        if key:
            name = key.group(1)
            parent = name.rsplit(".", 1)[0] if "." in name else None
            valid = _valid_keys(config_name, parent)
            where = f" under '{parent}'" if parent else ""
            raise UserError(f"{name}: unknown key{where}; valid keys: {', '.join(valid)}") from None
        raise UserError(text.splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _valid_keys(config_name: str, parent: str | None) -> list[str]:
    base = compose(config_name, [])
    node: Any = OmegaConf.select(base, parent) if parent else base
    if isinstance(node, DictConfig):
        return sorted(str(k) for k in node.keys())
    return []


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain python (for params, JSON, Tune's param_space)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as their string form)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def shared_root(configured: str | None = None) -> Path:
    """Where the real data of ../shared lives: config key, else $TIMFUSION_SHARED, else ../shared."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("TIMFUSION_SHARED")
    if env:
        return Path(env).expanduser()
    return ROOT.parent / "shared"


def task_config(name: str) -> dict[str, Any]:
    """A task's shipped config (``task=NAME``) as plain data; an unknown name lists the known ones."""
    for base in [PRIMARY_DIR, *SEARCH_DIRS]:
        path = base / "task" / f"{name}.yaml"
        if path.exists():
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    raise UserError(f"task {name!r}: unknown; valid choices: {', '.join(group_options('task'))}")
