"""Model references users pass as ``model=``: resolved to a ready-to-run ``Fuser``.

``baseline:NAME`` names a classic fuser of ``timfusion.tasks.fusers.BASELINES``.
"""

from __future__ import annotations

import torch

from timfusion.platform.errors import UserError
from timfusion.tasks.base import FusionTask
from timfusion.tasks.fusers import BASELINES, Fuser

MODEL_FORMS = ("baseline:NAME",)


def load_fuser(reference: str, task: FusionTask, device: torch.device | str = "cpu") -> Fuser:
    """The fuser ``reference`` names, in eval mode on ``device``."""
    kind, _, name = str(reference).partition(":")
    if kind == "baseline" and name:
        fuser = BASELINES.get(name)()
    else:
        raise UserError(
            f"model={reference}: unknown model reference; expected one of {', '.join(MODEL_FORMS)} "
            f"(baselines: {', '.join(BASELINES.names())})"
        )
    return fuser.to(device).eval()
