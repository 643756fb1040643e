"""The registered fusion tasks: IR/VIS, medical (and its three variants), multi-exposure, multi-focus."""

from __future__ import annotations

from timfusion.tasks.base import TASKS, FusionTask

_MEDICAL_B = ("ct", "pet", "spect")


@TASKS.register("ir_vis")
class InfraredVisible(FusionTask):
    """Infrared + visible: thermal targets from IR, texture and colour from the visible image."""

    name = "ir_vis"
    family = "ir_vis"
    roles = ("ir", "vis")
    role_folders = (("ir", "infrared", "IR"), ("vi", "vis", "visible", "VI"))
    synthetic = "ir_vis"
    classes = ("background", "person", "bicycle", "car")


@TASKS.register("medical")
class Medical(FusionTask):
    """MRI + CT/PET/SPECT: anatomy from MRI, bone (CT) or function (PET, SPECT, colour) from the other."""

    name = "medical"
    family = "medical"
    roles = ("mri", "other")
    role_folders = (("mri", "MRI"), _MEDICAL_B + ("other",))
    synthetic = "medical"
    classes = ("background", "tissue", "lesion")


@TASKS.register("mri_ct")
class MriCt(Medical):
    """MRI + CT (both grayscale)."""

    name = "mri_ct"
    roles = ("mri", "ct")
    role_folders = (("mri", "MRI"), ("ct", "CT"))
    synthetic = "mri_ct"


@TASKS.register("mri_pet")
class MriPet(Medical):
    """MRI + PET (colour): the PET luminance is fused, its chroma restored."""

    name = "mri_pet"
    roles = ("mri", "pet")
    role_folders = (("mri", "MRI"), ("pet", "PET"))
    synthetic = "mri_pet"


@TASKS.register("mri_spect")
class MriSpect(Medical):
    """MRI + SPECT (colour): the SPECT luminance is fused, its chroma restored."""

    name = "mri_spect"
    roles = ("mri", "spect")
    role_folders = (("mri", "MRI"), ("spect", "SPECT"))
    synthetic = "mri_spect"


@TASKS.register("multi_exposure")
class MultiExposure(FusionTask):
    """Under- + over-exposed shots of one scene: shadows from one, highlights from the other."""

    name = "multi_exposure"
    family = "multi_exposure"
    roles = ("under", "over")
    role_folders = (("under", "a", "A"), ("over", "b", "B"))
    synthetic = "multi_exposure"
    classes = ("background", "object")


@TASKS.register("multi_focus")
class MultiFocus(FusionTask):
    """Near- + far-focused shots of one scene: the sharp part of each."""

    name = "multi_focus"
    family = "multi_focus"
    roles = ("near", "far")
    role_folders = (("near", "a", "A"), ("far", "b", "B"))
    synthetic = "multi_focus"
    classes = ("background", "foreground")
