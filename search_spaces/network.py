"""Fusion networks built from a genotype; size counting; single-file persistence.

:class:`FusionNetwork` follows the public TIM code (``Network_Fusion9_Meta`` for stage
1, ``Network_Fusion9_3`` (mask merge) and ``Network_Fusion9_2`` (concat merge) for stage
2), reimplemented:

* stage 1: ``x = [a, b]`` (2 channels); stem ``conv3x3 2 -> stem_hidden, PReLU,
  conv3x3 -> C, PReLU`` (reflect padding, biases); the cells; the head (reflect-padded
  convs with bias, as the genotype lists them; no output activation in the published one).
* stage 2 (optional): branch i's stem is ``conv3x3 [source_i, stage1] -> stem_hidden,
  PReLU, conv3x3 -> C, BN, PReLU``, then its cells. ``mask`` merge: ``m = sigmoid(1x1(
  [max_c f_k, mean_c f_k]))`` from branch ``k = mask_branch``, fused = ``head(m f_k +
  (1 - m) f_other)``. ``concat`` merge: fused = ``head([f_0, f_1])`` (tanh output in the
  published medical genotypes). With an ``aux_head``, each branch also yields an
  auxiliary image (``forward_all``), which the public code trains with.

Any H, W: the inputs are reflect-padded at the bottom/right to the genotype's multiple
and every output is cropped back. :meth:`Fuser.forward` clips the result to [0, 1].
Unlike the public code (which leaves stage 2 in training mode at test time), ``eval()``
puts every BatchNorm in inference mode; :func:`load_model` returns the model in eval mode.

Deviations from the public code (none changes the parameter count by more than one):

* The mask gate sees ``[max_c, mean_c]`` through 2 weights; the public ``ChannelPool2``
  feeds ``[max_c, max_c, mean_c]`` to 3 weights, the duplicated max being redundant (the
  same function class, one parameter fewer).
* Sources are always ``a`` then ``b``: stage 1 sees ``[a, b]``, branch 0 is over ``a``,
  branch 1 over ``b``, ``concat`` is ``[f_0, f_1]``. The public scripts pass the sources in
  differing orders; each shipped genotype puts the published cells on the branch of the
  source that the script actually fed them (see the genotype descriptions).
* Padding to the multiple happens inside the network (reflect, bottom/right, cropped
  back), where the public scripts expect pre-padded images.
* Activations are kept channels-last (see :class:`Stem`): same results, faster on CPU.
* The anti-aliasing blur filter is a non-persistent buffer (not in the state dict).

Persistence is one file (:func:`save_model`, :func:`load_model`): a dict with the state
dict, the genotype as a JSON dict, the task configuration and a format version, loaded
with ``weights_only=True`` and ``strict=True``; any mismatch is a UserError naming the
file and the first offending keys.
"""

from __future__ import annotations

import copy
import functools
import io
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timfusion.platform.errors import UserError
from timfusion.search_spaces.cells import CELLS, Cell, OpSlot
from timfusion.search_spaces.genotype import Genotype, HeadSpec, load_genotype
from timfusion.search_spaces.ops import channel_max_mean
from timfusion.tasks.filters import box_mean
from timfusion.tasks.fusers import Fuser, check_pair
from timfusion.tasks.imageio import atomic_write_bytes, read_bytes

NetworkMakeOp = Callable[[str, int, int], nn.Module]
"""``make_op(cell_place, position, channels)``; ``cell_place`` as in :meth:`Genotype.cells`."""

FORMAT = "timfusion-model"
FORMAT_VERSION = 1


def conv_layer(c_in: int, c_out: int, kernel: int) -> nn.Conv2d:
    """TIM's ``ConvLayer``: a reflect-padded, stride-1 conv with bias."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="reflect")


class Stem(nn.Sequential):
    """``conv3x3 c_in -> hidden, PReLU, conv3x3 hidden -> C, [BN], PReLU``.

    The input is made channels-last, which every later layer keeps: oneDNN's depthwise and
    1x1 convolutions run an order of magnitude faster on CPU that way than in NCHW.
    """

    def __init__(self, c_in: int, hidden: int, channels: int, batch_norm: bool = False) -> None:
        layers: list[nn.Module] = [conv_layer(c_in, hidden, 3), nn.PReLU(), conv_layer(hidden, channels, 3)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(nn.PReLU())
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


def decision_weight(logit: Tensor) -> Tensor:
    """``clamp(0.5 + z, 0, 1)`` forward, identity gradient backward (straight-through).

    A sigmoid saturates: once a region's weight is near 0 or 1 its gradient vanishes and a
    network that chose one source everywhere early in training never recovers (observed:
    every pixel from IR). The clamp reaches exact 0 and 1, so a decisive region copies its
    source pixel for pixel, and the straight-through gradient can always move it back.
    """
    clamped = (logit + 0.5).clamp(0.0, 1.0)
    return clamped.detach() + (logit - logit.detach())


LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


class ActivityDecision(nn.Module):
    """A learned activity-level comparison of the two sources: a decision logit.

    ``e_s = box_mean(phi(s)^2)`` over a ``window`` x ``window`` box for each source ``s``,
    with ``phi`` one bias-free ``kernel`` x ``kernel`` conv to ``channels`` maps shared by
    both sources; ``z = sum_k v_k (e_a,k - e_b,k) / (e_a,k + e_b,k + 1e-8)``.

    Why: the network's cells see ``[a, b]`` mixed from the first conv and, in 30 minutes of
    CPU training, learn no per-pixel choice at all (they settle on a constant, one source
    everywhere). This comparison is antisymmetric (swapping the sources gives ``-z``) and
    scale-free (a normalised difference), so it transfers across sensors and exposures,
    and it starts as the classic focus/activity rule: every ``phi_k`` is initialised to the
    4-neighbour Laplacian (plus small noise so the maps differ) and ``v_k = gain /
    channels``, the slope of ``sigmoid(50 r)`` at 0 for the default gain 12.5. Training
    then adapts the filters, their weights and, through the head's convolutions, a
    content-dependent correction (thermal targets, the task's classes).
    """

    def __init__(self, channels: int = 4, kernel: int = 3, window: int = 23, gain: float = 12.5) -> None:
        super().__init__()
        self.window = window
        self.phi = nn.Conv2d(1, channels, kernel, padding=kernel // 2, padding_mode="reflect", bias=False)
        self.mix = nn.Conv2d(channels, 1, 1, bias=False)
        with torch.no_grad():
            centre = torch.ones(1, 1)
            if kernel >= 3:  # the Laplacian in the middle of the kernel
                centre = F.pad(torch.tensor(LAPLACIAN_3X3), (kernel // 2 - 1,) * 4)
            noise = torch.randn(channels, 1, kernel, kernel, generator=torch.Generator().manual_seed(0))
            self.phi.weight.copy_(centre.expand(channels, 1, kernel, kernel) + 0.01 * noise)
            self.mix.weight.fill_(gain / channels)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        energy = box_mean(self.phi(torch.cat((a, b))).square(), self.window // 2)
        e_a, e_b = energy[:n], energy[n:]
        return self.mix((e_a - e_b) / (e_a + e_b + 1e-8))


class Head(nn.Sequential):
    """The genotype's head: reflect-padded convs (each optionally + PReLU), then its output.

    :meth:`image` turns features into the fused image: the head's output itself, or for
    ``output: select`` the per-pixel blend ``w a + (1 - w) b`` with ``w = decision_weight(z)``,
    ``z`` the convolutions' output plus, where the genotype gives one, an
    :class:`ActivityDecision` of the sources; with it the last conv starts at zero, so the
    network starts as the activity rule and learns its corrections.
    """

    def __init__(self, c_in: int, spec: HeadSpec) -> None:
        layers: list[nn.Module] = []
        for layer in spec.layers:
            layers.append(conv_layer(c_in, layer.out, layer.kernel))
            if layer.act == "prelu":
                layers.append(nn.PReLU())
            c_in = layer.out
        if spec.output == "tanh":
            layers.append(nn.Tanh())
        super().__init__(*layers)
        self.select = spec.output == "select"
        self.activity: ActivityDecision | None = None
        if spec.activity is not None:
            last = layers[-2] if isinstance(layers[-1], nn.PReLU) else layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.activity = ActivityDecision(**spec.activity.to_dict())  # forward() skips it

    def forward(self, features: Tensor) -> Tensor:
        for name, layer in self._modules.items():
            if name != "activity":
                features = layer(features)
        return features

    def image(self, features: Tensor, a: Tensor, b: Tensor) -> Tensor:
        out = self(features)
        if not self.select:
            return out
        if self.activity is not None:
            out = box_mean(out, self.activity.window // 2) + self.activity(a, b)
        weight = decision_weight(out)
        return weight * a + (1 - weight) * b


class MaskGate(nn.Module):
    """``sigmoid(1x1([max_c f, mean_c f]))``: a soft per-pixel mask from one branch's features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 1, bias=False)

    def forward(self, feats: Tensor) -> Tensor:
        return torch.sigmoid(self.conv(channel_max_mean(feats)))


def _build_cells(specs, channels: int, prefix: str, make_op: NetworkMakeOp | None) -> nn.ModuleList:
    cells = nn.ModuleList()
    for i, spec in enumerate(specs):
        factory = None if make_op is None else functools.partial(make_op, f"{prefix}.{i}")
        cells.append(CELLS.get(spec.type)(channels, spec.ops, factory))
    return cells


class Stage1(nn.Module):
    def __init__(self, genotype: Genotype, make_op: NetworkMakeOp | None) -> None:
        super().__init__()
        c = genotype.width
        self.stem = Stem(2, genotype.stem_channels, c)
        self.cells = _build_cells(genotype.stage1, c, "stage1.cells", make_op)
        self.head = Head(c, genotype.head)

    def forward(self, x: Tensor) -> Tensor:
        sources = x
        x = self.stem(x)
        for cell in self.cells:
            x = cell(x)
        return self.head.image(x, sources[:, :1], sources[:, 1:2])


class Branch(nn.Module):
    def __init__(self, genotype: Genotype, index: int, make_op: NetworkMakeOp | None) -> None:
        super().__init__()
        c = genotype.width
        stage2 = genotype.stage2
        assert stage2 is not None
        self.stem = Stem(2, genotype.stem_channels, c, batch_norm=True)
        self.cells = _build_cells(stage2.branches[index].cells, c, f"stage2.branches.{index}.cells", make_op)
        self.aux = None if stage2.aux_head is None else Head(c, stage2.aux_head)

    def forward(self, source: Tensor, stage1: Tensor) -> Tensor:
        x = self.stem(torch.cat((source, stage1), 1))
        for cell in self.cells:
            x = cell(x)
        return x


class Stage2(nn.Module):
    def __init__(self, genotype: Genotype, make_op: NetworkMakeOp | None) -> None:
        super().__init__()
        spec = genotype.stage2
        assert spec is not None
        c = genotype.width
        self.merge = spec.merge
        self.mask_branch = spec.mask_branch
        self.branches = nn.ModuleList(Branch(genotype, i, make_op) for i in range(2))
        self.gate = MaskGate() if spec.merge == "mask" else None
        self.head = Head(c if spec.merge == "mask" else 2 * c, spec.head)

    def forward(self, a: Tensor, b: Tensor, stage1: Tensor, aux: bool = True) -> dict[str, Tensor]:
        feats = [self.branches[0](a, stage1), self.branches[1](b, stage1)]
        out: dict[str, Tensor] = {}
        if self.gate is not None:
            k = self.mask_branch
            mask = self.gate(feats[k])
            out["mask"] = mask
            fused = self.head.image(mask * feats[k] + (1 - mask) * feats[1 - k], a, b)
        else:
            fused = self.head.image(torch.cat(feats, 1), a, b)
        out["fused"] = fused
        for name, branch, f in zip(("aux_a", "aux_b"), self.branches, feats, strict=True):
            if aux and branch.aux is not None:
                out[name] = branch.aux(f)
        return out


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad H and W at the bottom/right up to ``multiple`` (reflect; replicate when too small)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class FusionNetwork(Fuser):
    """A TIM fusion network built from a :class:`Genotype`: ``fuse(a, b)`` -> fused image.

    ``make_op(cell_place, position, channels)`` overrides the op factory of every cell
    (the architecture search injects mixed operations this way).
    """

    name = "tim"

    def __init__(self, genotype: Genotype | str, make_op: NetworkMakeOp | None = None) -> None:
        super().__init__()
        self.genotype = load_genotype(genotype)
        self.multiple = self.genotype.multiple
        self.stage1 = Stage1(self.genotype, make_op)
        self.stage2 = Stage2(self.genotype, make_op) if self.genotype.stage2 is not None else None

    def cells(self) -> list[tuple[str, Cell]]:
        """Every cell with its place (``stage1.cells.0``, ``stage2.branches.1.cells.0``, ...)."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, Cell)]

    def op_slots(self) -> list[tuple[str, OpSlot, nn.Module]]:
        """Every op module, in order, with its cell's place and its slot."""
        return [(place, slot, op) for place, cell in self.cells() for slot, op in cell.op_slots()]

    def forward_all(self, a: Tensor, b: Tensor) -> dict[str, Tensor]:
        """Every output, unclipped and cropped to the input size: ``fused`` and ``stage1``;
        with stage 2 also ``mask`` (mask merge) and ``aux_a``/``aux_b`` (with an aux head)."""
        check_pair(a, b)
        h, w = a.shape[-2:]
        a_p, b_p = pad_to_multiple(a, self.multiple), pad_to_multiple(b, self.multiple)
        stage1 = self.stage1(torch.cat((a_p, b_p), 1))
        out = {"stage1": stage1, "fused": stage1}
        if self.stage2 is not None:
            out.update(self.stage2(a_p, b_p, stage1))
        return {k: v[..., :h, :w] for k, v in out.items()}

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        h, w = a.shape[-2:]
        a_p, b_p = pad_to_multiple(a, self.multiple), pad_to_multiple(b, self.multiple)
        fused = self.stage1(torch.cat((a_p, b_p), 1))
        if self.stage2 is not None:
            fused = self.stage2(a_p, b_p, fused, aux=False)["fused"]  # auxiliary heads: training only
        return fused[..., :h, :w]


def build_network(genotype: Genotype | str, make_op: NetworkMakeOp | None = None) -> FusionNetwork:
    return FusionNetwork(genotype, make_op)


# ----------------------------------------------------------------------------- size


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """The number of parameters (all, or only those requiring gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _macs(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    if isinstance(module, nn.ConvTranspose2d):  # each input pixel scatters a k x k x C_out/g patch
        return (
            inputs[0].numel()
            * (module.out_channels // module.groups)
            * module.kernel_size[0]
            * module.kernel_size[1]
        )
    if isinstance(module, nn.Conv2d | nn.Conv1d):
        k = 1
        for side in module.kernel_size:
            k *= side
        return output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def mac_profile(
    model: nn.Module, height: int, width: int, inputs: tuple[Tensor, ...] | None = None, full: bool = True
) -> dict[str, int]:
    """Multiply-accumulates of each Conv1d/Conv2d/ConvTranspose2d/Linear module, by name.

    Counted: one MAC per weight use (``out elements x in_channels/groups x kernel area``;
    transposed convs by their input elements), for one forward pass at batch 1 (inputs
    ``(1, 1, height, width)`` twice for a fuser, or ``inputs``). Not counted: biases,
    BatchNorm, activations, pooling, the fixed blur of the anti-aliased downsampling,
    bilinear upsampling, softmax and the element-wise products of the attention ops.
    ``full``: count a :class:`FusionNetwork`'s full forward (``forward_all``, auxiliary heads
    included, which is what the public code runs and the published figures count); with
    ``full=False`` only what inference (``fuse``) runs.
    Without ``inputs`` the pass runs on a copy of the model on the ``meta`` device (shapes
    only, no arithmetic), falling back to a real eval-mode, no-grad pass when an op has no
    meta kernel; the model itself is left untouched.
    """
    if inputs is None:
        try:
            meta = copy.deepcopy(model).to("meta")
            x = torch.zeros(1, 1, height, width, device="meta")
            return _profile(meta, (x, x), full)
        except (NotImplementedError, RuntimeError):
            pass
        param = next(model.parameters(), None)
        x = torch.zeros(
            1,
            1,
            height,
            width,
            dtype=param.dtype if param is not None else torch.float32,
            device=param.device if param is not None else "cpu",
        )
        inputs = (x, x)
    return _profile(model, inputs, full)


def _profile(model: nn.Module, inputs: tuple[Tensor, ...], full: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Conv1d | nn.ConvTranspose2d | nn.Linear):

            def hook(mod, args, output, name=name) -> None:
                counts[name] = counts.get(name, 0) + _macs(mod, args, output)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if full and isinstance(model, FusionNetwork):
                model.forward_all(*inputs)
            else:
                model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def count_macs(
    model: nn.Module, height: int, width: int, inputs: tuple[Tensor, ...] | None = None, full: bool = True
) -> int:
    """Total multiply-accumulates of one forward pass at ``height`` x ``width`` (see :func:`mac_profile`)."""
    return sum(mac_profile(model, height, width, inputs, full).values())


# ----------------------------------------------------------------------------- persistence


def save_model(path: str | os.PathLike, model: FusionNetwork, genotype: Genotype, task_config: dict) -> None:
    """Write the model to one file atomically: state dict, genotype, task config, format version."""
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "genotype": genotype.to_dict(),
        "task": dict(task_config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _first(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict(model: nn.Module, state: dict[str, Any], source: str, genotype_name: str) -> None:
    """Raise a UserError naming ``source`` and the first offending keys unless ``state`` fits ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    not_tensors = [k for k in state if k in expected and not isinstance(state[k], Tensor)]
    shapes = [
        f"{k} saved {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in expected.items()
        if isinstance(state.get(k), Tensor) and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if not_tensors:
        problems.append(f"not tensors: {_first(not_tensors)}")
    if shapes:
        problems.append(f"shape mismatch {_first(shapes, 2)}")
    if problems:
        raise UserError(f"{source}: weights do not fit genotype {genotype_name}: {'; '.join(problems)}")


def load_model(
    path: str | os.PathLike, genotype: Genotype | str | None = None
) -> tuple[FusionNetwork, Genotype, dict]:
    """Read a file written by :func:`save_model`: ``(model in eval mode, genotype, task config)``.

    ``genotype`` builds that genotype instead of the stored one (the weights must fit it).
    """
    raw = read_bytes(path)
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (pickle, zip and torch errors alike)
        raise UserError(f"{path}: not a timfusion model file ({err.__class__.__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path}: not a timfusion model file (no {FORMAT!r} format marker)")
    if payload.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: model format version {payload.get('version')!r}; this code reads {FORMAT_VERSION}"
        )
    for key, kind in (("genotype", dict), ("task", dict), ("state_dict", dict)):
        if not isinstance(payload.get(key), kind):
            raise UserError(f"{path}: model file has no {key} ({kind.__name__}) entry")
    geno = (
        Genotype.from_dict(payload["genotype"], source=f"{path} genotype")
        if genotype is None
        else load_genotype(genotype)
    )
    return network_with_weights(geno, payload["state_dict"], str(path)), geno, payload["task"]


def network_with_weights(genotype: Genotype, state: dict[str, Any], source: str) -> FusionNetwork:
    """The genotype's network holding ``state`` (strictly; a misfit is a UserError naming
    ``source``), in eval mode."""
    model = FusionNetwork(genotype)
    check_state_dict(model, state, source, genotype.name)
    model.load_state_dict(state, strict=True)
    return model.eval()


def size_report(
    model: FusionNetwork, height: int, width: int, profile: dict[str, int] | None = None
) -> list[tuple[str, nn.Module, int, int]]:
    """``(part, module, parameters, MACs)`` for each part of ``model``, in forward order.

    The parts are the stems, cells, heads, auxiliary heads and mask gate; their parameters
    and MACs add up to the model's totals. ``profile``: a :func:`mac_profile` already made.
    """
    if profile is None:
        profile = mac_profile(model, height, width)
    parts: list[tuple[str, nn.Module]] = [
        ("stage1.stem", model.stage1.stem),
        *((f"stage1.cells.{i}", cell) for i, cell in enumerate(model.stage1.cells)),
        ("stage1.head", model.stage1.head),
    ]
    if model.stage2 is not None:
        for b, branch in enumerate(model.stage2.branches):
            parts.append((f"stage2.branches.{b}.stem", branch.stem))
            parts += [(f"stage2.branches.{b}.cells.{i}", cell) for i, cell in enumerate(branch.cells)]
            if branch.aux is not None:
                parts.append((f"stage2.branches.{b}.aux", branch.aux))
        if model.stage2.gate is not None:
            parts.append(("stage2.gate", model.stage2.gate))
        parts.append(("stage2.head", model.stage2.head))
    return [
        (
            name,
            module,
            count_parameters(module),
            sum(v for k, v in profile.items() if k.startswith(name + ".")),
        )
        for name, module in parts
    ]
