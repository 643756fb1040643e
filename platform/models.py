"""Model references users pass as ``model=``, resolved to a ready-to-run ``Fuser``.

* ``baseline:NAME``: a classic fuser of ``timfusion.tasks.fusers.BASELINES``;
* ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered model (platform/model_registry.py);
* ``runs:/RUN_ID`` (or ``runs:/RUN_ID/path/model.pt``): a model an MLflow run logged
  (training logs ``model/model.pt``), from the configured tracking store;
* a local path: a model file written by ``save_model``, or a folder holding ``model.pt``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from timfusion.platform.errors import UserError, naming
from timfusion.tasks.base import FusionTask
from timfusion.tasks.fusers import BASELINES, Fuser

if TYPE_CHECKING:
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork

MODEL_FORMS = (
    "baseline:NAME", "models:/NAME@ALIAS", "models:/NAME/VERSION", "runs:/RUN_ID", "PATH/model.pt",
    "a folder holding model.pt",
)
NETWORK_FORMS = MODEL_FORMS[1:]  # the trained networks alone, without the classic fusers
MODEL_ARTIFACT = "model/model.pt"


def model_file(reference: str, tracking_uri: str | None = None) -> Path:
    """The local model file a ``runs:/`` reference or a path names (downloaded if remote)."""
    if reference.startswith("runs:/"):
        from timfusion.platform.tracking import Tracker, resolve_run
        from timfusion.platform.tracking import tracking_uri as default_uri

        uri = default_uri(tracking_uri)
        run_id, _, artifact = reference[len("runs:/"):].partition("/")
        resolve_run(uri, run_id)
        target = Path(tempfile.mkdtemp(prefix="timfusion-model-"))
        try:
            return Tracker(uri, run_id).download(artifact or MODEL_ARTIFACT, target)
        except Exception as err:
            raise UserError(f"model={reference}: run has no artifact {artifact or MODEL_ARTIFACT} "
                            f"({err})") from None
    path = Path(reference)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise UserError(f"model={reference}: no such model file; expected one of {', '.join(NETWORK_FORMS)}")
    return path


def load_network(reference: str, tracking_uri: str | None = None) -> tuple[FusionNetwork, Genotype, dict]:
    """A trained network (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/``, a
    path) in eval mode, with its genotype and task config; registered models are checksummed."""
    if reference.startswith("models:/"):
        from timfusion.platform.model_registry import load_registered

        return load_registered(reference, tracking_uri)
    from timfusion.search_spaces.network import load_model

    return load_model(model_file(reference, tracking_uri))


def load_fuser(
    reference: str, task: FusionTask, device: torch.device | str = "cpu", tracking_uri: str | None = None
) -> Fuser:
    """The fuser ``reference`` names, in eval mode on ``device``."""
    kind, _, name = str(reference).partition(":")
    if kind == "baseline" and name:
        with naming(f"model={reference}"):  # the registry's message, with the key it came from
            fuser = BASELINES.get(name)()
    elif str(reference).startswith(("runs:/", "models:/")) or Path(str(reference)).suffix == ".pt" or Path(
        str(reference)
    ).is_dir():
        fuser, _, task_config = load_network(str(reference), tracking_uri)
        trained_for = task_config.get("name")
        if trained_for and trained_for != task.name and trained_for != getattr(task, "family", None):
            raise UserError(f"model={reference}: trained for task {trained_for!r}, not {task.name!r} "
                            f"(pass task={trained_for})")
    else:
        raise UserError(
            f"model={reference}: unknown model reference; expected one of {', '.join(MODEL_FORMS)} "
            f"(baselines: {', '.join(BASELINES.names())})"
        )
    return fuser.to(device).eval()
