"""``timfusion export``: a trained fusion network as an ONNX or TorchScript file.

An exported file runs without this package (onnxruntime, libtorch): two N x 1 x H x W
float32 inputs ``a``, ``b`` on [0, 1], one output ``fused`` of the same shape, with batch,
height and width dynamic. The export is made in memory, checked (``check=true``: run at
another size than the export size and compared with PyTorch) and only then written,
atomically, so a failed export or check leaves nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from timfusion.platform.errors import UserError, check_bounds, is_integer
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import check_places
from timfusion.platform.models import NETWORK_FORMS, load_network
from timfusion.search_spaces.network import FusionNetwork
from timfusion.tasks.filters import box_mean
from timfusion.tasks.imageio import atomic_write_bytes, is_url, path_exists

FORMATS = ("onnx", "torchscript")
MIN_SIDE = 32  # smallest exported height/width: the activity window (23 px) and reflect pads need room
EXAMPLE_BATCH = 2  # not 1, so that torch.export keeps the batch axis dynamic
CHECK_GROWTH = (13, 7)  # the check runs at (height + 13) x (width + 7): not the export size
INPUT_NAMES = ("a", "b")
OUTPUT_NAME = "fused"
DYNAMO_MIN_OPSET = 18  # the torch.export-based ONNX exporter's own opset: it cannot convert this network down


class ExportableFusion(nn.Module):
    """``network(a, b)`` (pad to the genotype's multiple, stages, crop, clip) written with
    shape arithmetic only, so that tracing and ``torch.export`` keep H and W symbolic.

    Why not the network itself: its padding branches on the padded amount in Python (a
    trace would bake the export size's padding in) and its input check is eager-only.
    """

    def __init__(self, network: FusionNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        net = self.network
        h, w = a.shape[-2], a.shape[-1]
        m = net.multiple
        if m > 1:  # always pad (by 0 where already a multiple): no size-dependent branch
            pad = (0, (w + m - 1) // m * m - w, 0, (h + m - 1) // m * m - h)
            a, b = F.pad(a, pad, mode="reflect"), F.pad(b, pad, mode="reflect")
        fused = net.stage1(torch.cat((a, b), 1))
        if net.stage2 is not None:
            fused = net.stage2(a, b, fused, aux=False)["fused"]
        return fused[..., :h, :w].clamp(0.0, 1.0)


def box_mean_functional(x: Tensor, radius: int, border: str = "replicate") -> Tensor:
    """:func:`~timfusion.tasks.filters.box_mean` (replicate border) without in-place updates.

    The same float64 window sums from cumulative sums, over a replicate-padded copy instead
    of writing the border windows into slices: the ONNX exporters mistranslate those
    in-place slice updates (wrong values, or shapes onnxruntime rejects).
    """
    if radius == 0 or border != "replicate":
        return box_mean(x, radius, border)
    k = 2 * radius + 1
    y = F.pad(x, (radius, radius, radius, radius), mode="replicate").to(torch.float64)
    for dim, lead in ((-1, (1, 0)), (-2, (0, 0, 1, 0))):
        c = F.pad(torch.cumsum(y, dim), lead)  # a leading 0: window i sums c[i + k] - c[i]
        n = c.shape[dim]
        y = c.narrow(dim, k, n - k) - c.narrow(dim, 0, n - k)
    return (y / float(k * k)).to(x.dtype)


@contextlib.contextmanager
def onnx_friendly_box_mean() -> Iterator[None]:
    """Let the network use :func:`box_mean_functional` while an ONNX export traces it."""
    from timfusion.search_spaces import network as network_module

    original = network_module.box_mean
    network_module.box_mean = box_mean_functional
    try:
        yield
    finally:
        network_module.box_mean = original


def _example(height: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (EXAMPLE_BATCH, 1, height, width)
    return torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)


def _opset_of(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _onnx_dynamo(module: nn.Module, example: tuple[Tensor, Tensor], opset: int) -> bytes:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the exporter translates the graph with it)
    except ImportError as err:
        raise UserError(f"opset={opset}: the torch.export-based ONNX exporter needs the packages onnx and "
                        f"onnxscript ({err}); pip install onnx onnxscript onnxruntime") from None
    axes = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=MIN_SIDE),
            3: torch.export.Dim("width", min=MIN_SIDE)}
    program = torch.onnx.export(
        module, example, dynamo=True, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        opset_version=opset, dynamic_shapes={"a": axes, "b": axes}, optimize=True, verbose=False,
    )
    proto = program.model_proto
    if _opset_of(proto) != opset:  # it converts down on request, and keeps its own opset when it cannot
        raise UserError(f"opset={opset}: the exporter wrote opset {_opset_of(proto)} instead")
    return proto.SerializeToString()


def _onnx_torchscript(module: nn.Module, example: tuple[Tensor, Tensor], opset: int) -> bytes:
    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    torch.onnx.export(
        module, example, buffer, dynamo=False, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
        opset_version=opset, dynamic_axes={name: axes for name in (*INPUT_NAMES, OUTPUT_NAME)},
    )
    return buffer.getvalue()


def export_onnx(network: FusionNetwork, height: int, width: int, opset: int = 17) -> bytes:
    """The network as ONNX bytes (weights inside) with dynamic batch, height and width.

    Opset 18 and up: the ``torch.export``-based exporter. Below: the TorchScript-based one
    (``dynamo=False``), as the newer one writes opset 18 and cannot convert this network's
    reflect padding (``Pad``) down to 17. Both trace :class:`ExportableFusion` with
    :func:`box_mean_functional`; :func:`check_exported` verifies the result at another size.
    """
    module = ExportableFusion(network).eval()
    exporter = _onnx_dynamo if opset >= DYNAMO_MIN_OPSET else _onnx_torchscript
    try:
        with torch.no_grad(), warnings.catch_warnings(), onnx_friendly_box_mean():
            warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
            return exporter(module, _example(height, width), opset)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 (tracing, torch.export and translation errors alike)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"format=onnx opset={opset}: export of genotype {network.genotype.name} failed: "
                        f"{type(err).__name__}: {first}") from None


def export_torchscript(network: FusionNetwork, height: int, width: int) -> bytes:
    """The network as a TorchScript archive (``torch.jit.trace`` of :class:`ExportableFusion`).

    Traced rather than scripted: the network's Python (registries, input checks) does not
    script, and the trace keeps every size symbolic (check it with :func:`run_exported`).
    """
    module = ExportableFusion(network).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about size-dependent Python branches; torch.jit's FutureWarning
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, _example(height, width), check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def export_network(network: FusionNetwork, fmt: str, height: int, width: int, opset: int = 17) -> bytes:
    """``network`` exported to ``fmt`` (``onnx`` or ``torchscript``) at an example size, as bytes."""
    if fmt == "onnx":
        return export_onnx(network, height, width, opset)
    if fmt == "torchscript":
        return export_torchscript(network, height, width)
    raise UserError(f"format={fmt}: unknown; valid choices: {', '.join(FORMATS)}")


def run_exported(fmt: str, data: bytes, a: Tensor, b: Tensor) -> Tensor:
    """Fuse ``a``, ``b`` with an exported file's bytes: onnxruntime (CPU) or ``torch.jit.load``."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("check=true: needs the package onnxruntime (pip install onnxruntime), "
                            "or pass check=false") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feeds = {"a": a.numpy(), "b": b.numpy()}
        return torch.from_numpy(session.run([OUTPUT_NAME], feeds)[0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still the format asked for
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return module(a, b)


def _check_pair(height: int, width: int, seed: int) -> tuple[Tensor, Tensor]:
    size = (height + CHECK_GROWTH[0], width + CHECK_GROWTH[1])
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *size), generator=gen), torch.rand((1, 1, *size), generator=gen)


def check_exported(
    fmt: str, data: bytes, network: FusionNetwork, height: int, width: int, seed: int = 0
) -> tuple[float, tuple[int, int]]:
    """``(max |exported - torch|, (H, W))`` on one random pair at a size other than the export
    size: catches sizes baked into the export as well as numerical differences."""
    a, b = _check_pair(height, width, seed)
    with torch.no_grad():
        expected = network(a, b)
    size = (a.shape[-2], a.shape[-1])
    try:
        got = run_exported(fmt, data, a, b)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 (onnxruntime and TorchScript runtime errors alike)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"check: the exported {fmt} file fails at {size[0]}x{size[1]}: "
                        f"{type(err).__name__}: {first}") from None
    if got.shape != expected.shape:
        raise UserError(f"check: the exported {fmt} file gives shape {tuple(got.shape)} at "
                        f"{size[0]}x{size[1]}, PyTorch {tuple(expected.shape)}")
    return float((got - expected).abs().max()), size


def float32_error(network: FusionNetwork, height: int, width: int, seed: int = 0) -> float:
    """PyTorch's own max |float32 - float64| on the check's pair: what rounding alone explains
    (large for untrained or badly scaled weights), told with a failed check."""
    a, b = _check_pair(height, width, seed)
    with torch.no_grad():
        return float((network(a, b) - copy.deepcopy(network).double()(a.double(), b.double())).abs().max())


def _side(key: str, value: object) -> int:
    if not is_integer(value) or value < MIN_SIDE:
        raise UserError(f"{key}={value}: must be an integer >= {MIN_SIDE}")
    return value


@command("export", config="export", summary="export a trained network to ONNX or TorchScript")
def export(cfg: DictConfig) -> dict:
    """Export ``model`` to ``out``; every input is checked before the (slow) export starts."""
    fmt = str(cfg.format).lower()
    if fmt not in FORMATS:
        raise UserError(f"format={cfg.format}: unknown; valid choices: {', '.join(FORMATS)}")
    height, width = _side("height", cfg.height), _side("width", cfg.width)
    check_bounds("", cfg, at_least_one=("opset",), non_negative=("tolerance",))
    opset = int(cfg.opset)
    tolerance = float(cfg.tolerance)
    check_places(cfg, "model", "out")
    out = str(cfg.out)
    if not is_url(out) and Path(out).is_dir():
        raise UserError(f"out={out}: is a folder; give a file path (e.g. {Path(out) / 'fusion.onnx'})")
    if not cfg.overwrite and path_exists(out):
        raise UserError(f"{out}: exists; pass overwrite=true to replace it")
    reference = str(cfg.model)
    if reference.startswith("baseline:"):
        raise UserError(f"model={reference}: a baseline is a classic fuser, not a trained network; "
                        f"export takes {', '.join(NETWORK_FORMS)}")
    network, genotype, _ = load_network(reference, cfg.tracking.uri)
    network = network.cpu().eval()
    data = export_network(network, fmt, height, width, opset)
    diff = None
    what = f"{fmt}, opset {opset}" if fmt == "onnx" else fmt
    if cfg.check:
        diff, (h, w) = check_exported(fmt, data, network, height, width)
        agreement = f"max |{fmt} - torch| = {diff:.2g} at {h}x{w}"
        if not diff <= tolerance:  # also catches NaN
            noise = float32_error(network, height, width)
            raise UserError(
                f"check: max |{fmt} - torch| = {diff:.3g} at {h}x{w} exceeds tolerance={tolerance:g} "
                f"(PyTorch's own float32 rounding there: {noise:.3g} vs float64; where that explains it, "
                f"pass a larger tolerance=); nothing written to {out}"
            )
    else:
        agreement = "not checked (check=false)"
    atomic_write_bytes(out, data)
    print(f"exported {reference} ({genotype.name}) to {out} ({what}): {agreement}")
    return {"out": out, "format": fmt, "max_abs_diff": diff, "genotype": genotype.name,
            "opset": opset if fmt == "onnx" else None, "bytes": len(data)}
