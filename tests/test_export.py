"""``timfusion export``: ONNX and TorchScript files agree with PyTorch at other sizes; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from timfusion.search_spaces.network import FusionNetwork, load_model, save_model

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

EXPORT = ("height=64", "width=64")  # small example size: the whole file stays quick on 2 cores


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A compact network with seeded random weights everywhere (also the zero-initialised
    decision conv and the BatchNorm statistics, so no part is an identity)."""
    torch.manual_seed(0)
    network = FusionNetwork("compact")
    with torch.no_grad():
        for param in network.parameters():
            param.add_(0.1 * torch.randn_like(param))
        for name, buffer in network.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand_like(buffer))
    path = tmp_path_factory.mktemp("export_model") / "model.pt"
    save_model(path, network, network.genotype, {"name": "ir_vis"})
    return path


def _report(diffs: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())


def _pair(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, h, w), generator=gen), torch.rand((n, 1, h, w), generator=gen)


SIZES = ((2, 64, 64), (1, 37, 53))  # the export size, and one that is not (nor a multiple of anything)


def _onnx_agreement(path: str, model_file: Path, opset: int) -> dict[str, float]:
    """Check the ONNX file's interface, then max |onnx - torch| at each of SIZES."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    assert [o.name for o in proto.graph.output] == ["fused"]
    n, c, h, w = proto.graph.input[0].type.tensor_type.shape.dim
    assert c.dim_value == 1 and all(d.dim_param and not d.dim_value for d in (n, h, w))  # dynamic N, H, W
    network, _, _ = load_model(model_file)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    diffs = {}
    for seed, (n, h, w) in enumerate(SIZES):
        a, b = _pair(n, h, w, seed)
        with torch.no_grad():
            expected = network(a, b)
        got = torch.from_numpy(session.run(["fused"], {"a": a.numpy(), "b": b.numpy()})[0])
        assert got.shape == expected.shape == (n, 1, h, w)
        diffs[f"{n}x{h}x{w}"] = float((got - expected).abs().max())
    return diffs


def test_onnx_export_matches_torch(cli, model_file, workdir, one_thread, capsys):
    code, out, err = cli("export", f"model={model_file}", "out=fusion.onnx", *EXPORT)
    assert code == 0, err
    assert "(compact) to fusion.onnx (onnx, opset 17): max |onnx - torch| = " in out and "at 77x71" in out
    diffs = _onnx_agreement("fusion.onnx", model_file, 17)
    with capsys.disabled():
        print(f"\n[export] max |onnx - torch| (opset 17): {_report(diffs)}")
    assert max(diffs.values()) <= 1e-4, diffs
    assert sorted(p.name for p in workdir.iterdir()) == ["fusion.onnx"]  # one file, no .part left


@pytest.mark.slow
def test_onnx_opset_18_torch_export_exporter(cli, model_file, workdir, one_thread, capsys):
    code, out, err = cli("export", f"model={model_file}", "out=fusion.onnx", *EXPORT, "opset=18")
    assert code == 0, err
    assert "(onnx, opset 18): max |onnx - torch| = " in out
    diffs = _onnx_agreement("fusion.onnx", model_file, 18)
    with capsys.disabled():
        print(f"\n[export] max |onnx - torch| (opset 18): {_report(diffs)}")
    assert max(diffs.values()) <= 1e-4, diffs


def test_torchscript_export_matches_torch(cli, model_file, workdir, one_thread, capsys):
    code, out, err = cli("export", f"model={model_file}", "format=torchscript", "out=fusion.pt", *EXPORT)
    assert code == 0, err
    assert "to fusion.pt (torchscript): max |torchscript - torch| = " in out
    module = torch.jit.load("fusion.pt")
    network, _, _ = load_model(model_file)
    diffs = {}
    for seed, (n, h, w) in enumerate(SIZES):
        a, b = _pair(n, h, w, seed)
        with torch.no_grad():
            expected, got = network(a, b), module(a, b)
        assert got.shape == expected.shape == (n, 1, h, w)
        diffs[f"{n}x{h}x{w}"] = float((got - expected).abs().max())
    with capsys.disabled():
        print(f"\n[export] max |torchscript - torch|: {_report(diffs)}")
    assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("format=tflite",), "format=tflite: unknown; valid choices: onnx, torchscript"),
        (("model=baseline:lp",), "model=baseline:lp: a baseline is a classic fuser, not a trained network"),
        (("model=missing.pt",), "model=missing.pt: no such model file; expected one of models:/NAME@ALIAS"),
        (("height=16",), "height=16: must be an integer >= 32"),
    ],
)
def test_bad_input_is_one_clear_error(cli, model_file, workdir, args, message):
    code, _, err = cli("export", f"model={model_file}", "out=fusion.onnx", *EXPORT, *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert list(workdir.iterdir()) == []


def test_missing_keys_are_required(cli, workdir):
    code, _, err = cli("export", "out=fusion.onnx")
    assert code == 2 and "model: required" in err
    code, _, err = cli("export", "model=model.pt")
    assert code == 2 and "out: required" in err


def test_existing_out_is_refused_then_overwritten(cli, model_file, workdir, one_thread):
    target = workdir / "fusion.pt"
    target.write_bytes(b"keep me")
    code, _, err = cli("export", f"model={model_file}", "format=torchscript", f"out={target}", *EXPORT)
    assert code == 2 and "fusion.pt: exists; pass overwrite=true" in err
    assert target.read_bytes() == b"keep me"
    code, _, err = cli("export", f"model={model_file}", "format=torchscript", f"out={target}", *EXPORT,
                       "overwrite=true", "check=false")
    assert code == 0, err
    assert target.read_bytes() != b"keep me" and torch.jit.load(str(target)) is not None


def test_failed_check_writes_nothing(cli, model_file, workdir, one_thread, monkeypatch):
    from timfusion.platform.jobs import export

    monkeypatch.setattr(export, "check_exported", lambda *args, **kwargs: (0.5, (77, 71)))
    code, _, err = cli("export", f"model={model_file}", "format=torchscript", "out=fusion.pt", *EXPORT)
    assert code == 2 and "max |torchscript - torch| = 0.5 at 77x71 exceeds tolerance=0.0001 (PyTorch" in err
    assert "nothing written to fusion.pt" in err
    assert list(workdir.iterdir()) == []
