"""Configuration: Hydra composition over config groups kept next to the code they configure.

The primary configs (one per command) live in ``platform/conf``; group folders are
found on a search path: ``tasks/conf`` (``task=``), ``clusters`` (``cluster=``) and the
other areas' ``conf`` folders as they appear. Composition errors (an unknown group value,
an unknown key, a malformed override, a value of another type than the key's default) become
one-line ``UserError``s that list the valid choices, before any work starts.
"""

from __future__ import annotations

import functools
import os
import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import timfusion
from timfusion.platform.errors import UserError, is_integer, is_number

ROOT = Path(timfusion.__file__).resolve().parent
PRIMARY_DIR = ROOT / "platform" / "conf"
SEARCH_DIRS = [ROOT / "tasks" / "conf", ROOT / "clusters" / "conf", ROOT / "search_spaces" / "conf",
               ROOT / "meta" / "conf"]


def _search_path() -> list[str]:
    return [f"file://{path}" for path in SEARCH_DIRS if path.is_dir()]


def _option_files(group: str) -> list[Path]:
    """The YAML file of each option of a config group, over every config folder."""
    return sorted(path for base in [PRIMARY_DIR, *SEARCH_DIRS] for path in (base / group).glob("*.yaml"))


def group_options(group: str) -> list[str]:
    """The values a config group (``task``, ``cluster``, ...) can take."""
    return sorted({path.stem for path in _option_files(group)})


def check_option(group: str, value: str, key: str) -> None:
    """``value`` is an option of the config group ``group``; else a UserError naming ``key``."""
    if value not in group_options(group):
        raise UserError(f"{key}={value}: unknown value; valid choices: {', '.join(group_options(group))}")


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
            check_option(group.group(1), group.group(2), group.group(1))
        raise UserError(text.splitlines()[0]) from None
    except OverrideParseException as err:
        raise UserError(f"malformed override: {str(err).splitlines()[0]}") from None
    except ConfigCompositionException as err:
        text = str(err)
        key = (re.search(r"Could not override '([^']+)'", text)
               or re.search(r"Key '([^']+)' is not in struct", text))
        if key and _open_mapping(config_name, key.group(1)):  # data.filter={split: val}: the user's keys
            opened = [f"++{o}" if o.partition("=")[0] == key.group(1) else o for o in overrides]
            return compose(config_name, opened)
        if key:
            reason = _refused_key(config_name, key.group(1), overrides)
            raise UserError(reason or text.splitlines()[0]) from None
        raise UserError(text.splitlines()[0]) from None
    finally:
        GlobalHydra.instance().clear()
    _check_types(config_name, overrides, cfg)
    return cfg


def _expected_type(default: Any, value: Any) -> str | None:
    """What ``value`` should have been, where ``default`` says and it is not (None passes)."""
    if value is None or default is None or isinstance(default, DictConfig):
        return None
    if isinstance(default, ListConfig):
        return None if isinstance(value, ListConfig) else "a list, such as [a,b]"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int):
        return None if is_integer(value) else "an integer"
    if isinstance(default, float):
        return None if is_number(value) else "a number"
    return None


@functools.cache
def _defaults(config_name: str, groups: tuple[str, ...]) -> DictConfig:
    return compose(config_name, list(groups))


@functools.cache
def _group_values(key: str) -> tuple[Any, ...]:
    """``key``'s value in every option of its config group (``cluster.num_workers``: in each
    cluster's YAML): where they differ in type (4 or ``auto``), each type is accepted."""
    group, _, rest = key.partition(".")
    values = []
    for path in _option_files(group) if rest else []:
        try:
            values.append(OmegaConf.select(OmegaConf.load(path), rest, default=None))
        except Exception:  # an interpolation into the composed config: that one says nothing
            continue
    return tuple(values)


def _check_types(config_name: str, overrides: list[str], cfg: DictConfig) -> None:
    """Each ``key=value`` override must keep a type the key has by default (an integer stays an
    integer, a flag true or false): a wrong one is a UserError here, not a traceback, or a hang,
    deep in a Ray worker later."""
    assigned = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and not key.startswith(("+", "~", "hydra.")) and not group_options(key):
            assigned[key] = value
    if not assigned:
        return
    defaults = _defaults(config_name, tuple(o for o in overrides if o.partition("=")[0] not in assigned))
    for key, text in assigned.items():
        try:
            default, value = OmegaConf.select(defaults, key), OmegaConf.select(cfg, key)
        except Exception:  # an interpolation that does not resolve: left to the job's own checks
            continue
        expected = _expected_type(default, value)
        if expected and all(_expected_type(other, value) for other in _group_values(key)):
            shown = str(default).lower() if isinstance(default, bool) else default
            raise UserError(f"{key}={text}: expected {expected} (default {shown})")


_MISSING = object()


# mappings of the user's names (parameters, metrics, hypergradient options), as fnmatch patterns
FREE_FORM = ("tune.space", "gate.metrics", "search.hypergrad_options", "search.hypergrad_options.*")


def _open_mapping(config_name: str, name: str) -> bool:
    """Whether ``name`` is, or lies under, a mapping whose keys are the user's, which Hydra's
    struct mode refuses: one empty by default (``data.filter``, ``tags``) or matching :data:`FREE_FORM`."""
    base = compose(config_name, [])
    node, parent = OmegaConf.select(base, name, default=_MISSING), name
    while node is _MISSING and "." in parent:
        parent = parent.rsplit(".", 1)[0]
        node = OmegaConf.select(base, parent, default=_MISSING)
    return isinstance(node, DictConfig) and (len(node) == 0 or any(fnmatch(parent, f) for f in FREE_FORM))


def _refused_key(config_name: str, name: str, overrides: list[str]) -> str | None:
    """Why Hydra refused an override of ``name``: a key unknown under its nearest existing parent
    (whose keys are listed), or a config group's name given where this command keeps a mapping of
    that name (fuse's ``data=synthetic``: its keys are listed). None: neither."""
    base = compose(config_name, [])
    node = OmegaConf.select(base, name, default=_MISSING)
    if isinstance(node, DictConfig):
        value = next((o.partition("=")[2] for o in overrides if o.partition("=")[0] == name), "")
        keys = ", ".join(f"{name}.{k}" for k in sorted(str(k) for k in node.keys()))
        return f"{name}={value}: not a config group of this command; set its keys: {keys}"
    if node is not _MISSING:
        return None
    parent = name
    while "." in parent:
        parent = parent.rsplit(".", 1)[0]
        node = OmegaConf.select(base, parent, default=_MISSING)
        if isinstance(node, DictConfig):
            valid = ", ".join(sorted(map(str, node.keys())))
            return f"{name}: unknown key under '{parent}'; valid keys: {valid}"
        if node is not _MISSING:  # under a value that holds no keys
            return f"{name}: {parent} is a value, not a mapping of keys"
    return f"{name}: unknown key; valid keys: {', '.join(sorted(map(str, base.keys())))}"


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


def task_config(name: str, key: str = "task") -> dict[str, Any]:
    """A task's shipped config (``task=NAME``) as plain data; an unknown name lists the known ones
    under the setting ``key`` it came from."""
    for base in [PRIMARY_DIR, *SEARCH_DIRS]:
        path = base / "task" / f"{name}.yaml"
        if path.exists():
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    raise UserError(f"{key}: task {name!r} unknown; valid choices: {', '.join(group_options('task'))}")
