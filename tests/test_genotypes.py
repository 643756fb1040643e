"""Every shipped genotype: JSON, building, odd sizes, persistence, validation, sizes, `arch show`."""

from __future__ import annotations

import io
import json

import pytest
import torch

from timfusion.platform.errors import UserError
from timfusion.search_spaces.genotype import GENOTYPE_DIR, GENOTYPES, Genotype, load_genotype
from timfusion.search_spaces.network import (
    FusionNetwork,
    count_macs,
    count_parameters,
    load_model,
    mac_profile,
    save_model,
    size_report,
)
from timfusion.search_spaces.ops import OPS

PUBLISHED = {  # REFERENCE.md, counted from the public code at 256x256: (parameters, MACs)
    "tim_ivif": (1.23e6, 33.4e9),
    "tim_light": (127e3, 8.3e9),
}
TASK = {"name": "ir_vis", "sources": ["ir", "vis"]}


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Small tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, FusionNetwork]:
    torch.manual_seed(1)
    return {name: FusionNetwork(name).eval() for name in GENOTYPES()}


def _pair(h: int, w: int, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, h, w), torch.rand(n, 1, h, w)


def test_the_named_genotypes_ship():
    assert {"tim_ivif", "tim_light", "tim_mri_ct", "tim_mri_pet", "tim_mri_spect", "compact"} <= set(
        GENOTYPES()
    )


@pytest.mark.parametrize("name", GENOTYPES())
def test_json_round_trip(name):
    genotype = load_genotype(name)
    assert genotype.name == name
    again = Genotype.from_json(genotype.to_json())
    assert again == genotype and again.to_dict() == genotype.to_dict()
    on_disk = json.loads((GENOTYPE_DIR / f"{name}.json").read_text())
    assert Genotype.from_dict(on_disk) == genotype


@pytest.mark.parametrize("name", GENOTYPES())
def test_forward_on_odd_sizes_keeps_the_size_in_unit_range(models, name):
    model = models[name]
    for h, w in [(37, 53), (5, 9)]:
        a, b = _pair(h, w)
        with torch.no_grad():
            fused = model(a, b)
        assert fused.shape == (1, 1, h, w)
        assert torch.isfinite(fused).all() and fused.min() >= 0 and fused.max() <= 1


@pytest.mark.parametrize("name", GENOTYPES())
def test_forward_all_names_every_output(models, name):
    genotype = load_genotype(name)
    a, b = _pair(12, 16)
    with torch.no_grad():
        out = models[name].forward_all(a, b)
        assert torch.equal(models[name](a, b), out["fused"].clamp(0, 1))
    expected = {"fused", "stage1"}
    if genotype.stage2 is not None:
        expected |= {"mask"} if genotype.stage2.merge == "mask" else set()
        expected |= {"aux_a", "aux_b"} if genotype.stage2.aux_head is not None else set()
    assert set(out) == expected
    assert all(v.shape == (1, 1, 12, 16) for v in out.values())


@pytest.mark.parametrize("name", GENOTYPES())
def test_training_gradients_reach_every_parameter(name):
    model = FusionNetwork(name).train()
    out = model.forward_all(*_pair(12, 20, n=2))
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    for key, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), key
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0


@pytest.mark.parametrize("name", GENOTYPES())
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name):
    model = FusionNetwork(name).train()
    with torch.no_grad():
        model(*_pair(16, 20, n=2))  # non-trivial BatchNorm running statistics
    model.eval()
    a, b = _pair(21, 18)
    with torch.no_grad():
        expected = model(a, b)
    path = tmp_path / f"{name}.pt"
    save_model(path, model, model.genotype, TASK)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # one file, no leftovers
    loaded, genotype, task = load_model(path)
    assert genotype == model.genotype and task == TASK and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(a, b), expected)


def test_loading_with_a_mismatched_genotype_names_the_keys(tmp_path):
    model = FusionNetwork("tim_light")
    path = tmp_path / "light.pt"
    save_model(path, model, model.genotype, TASK)
    with pytest.raises(UserError, match=r"light\.pt: weights do not fit genotype compact: .*stage1\.") as err:
        load_model(path, genotype="compact")
    assert "shape mismatch" in str(err.value) or "missing keys" in str(err.value)
    # the same through a file whose stored genotype was swapped
    payload = torch.load(path, weights_only=True)
    payload["genotype"] = load_genotype("compact").to_dict()
    torch.save(payload, path)
    with pytest.raises(UserError, match="weights do not fit genotype compact"):
        load_model(path)


def test_a_tampered_state_dict_is_refused_naming_the_keys(tmp_path):
    model = FusionNetwork("compact")
    path = tmp_path / "compact.pt"
    save_model(path, model, model.genotype, TASK)
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    first = next(iter(state))
    del state[first]
    state["stage1.bogus.weight"] = torch.zeros(3)
    torch.save(payload, path)
    with pytest.raises(UserError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message and f"missing keys {first}" in message
    assert "unexpected keys stage1.bogus.weight" in message

    payload = torch.load(io.BytesIO(_saved(model)), weights_only=True)
    key = "stage1.head.0.weight"
    payload["state_dict"][key] = torch.zeros(2, 2, 3, 3)
    torch.save(payload, path)
    with pytest.raises(UserError, match=rf"shape mismatch {key} saved \(2, 2, 3, 3\)"):
        load_model(path)


def _saved(model: FusionNetwork) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {
            "format": "timfusion-model",
            "version": 1,
            "genotype": model.genotype.to_dict(),
            "task": TASK,
            "state_dict": model.state_dict(),
        },
        buffer,
    )
    return buffer.getvalue()


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.pt: not a timfusion model file"):
        load_model(junk)
    with pytest.raises(UserError, match="no such file"):
        load_model(tmp_path / "absent.pt")


def _compact_dict() -> dict:
    return json.loads((GENOTYPE_DIR / "compact.json").read_text())


def test_an_unknown_op_lists_the_known_ones():
    data = _compact_dict()
    data["stage1"]["cells"][1]["ops"][0] = "foo"
    with pytest.raises(UserError) as err:
        Genotype.from_dict(data)
    message = str(err.value)
    assert "genotype compact stage1 cell 1 position 0: unknown operation 'foo'; known: " in message
    assert all(name in message for name in OPS.names())


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            lambda d: d["stage1"]["cells"][0].update(type="ring"),
            "unknown cell type 'ring'; known: chain, multiscale",
        ),
        (lambda d: d.update(colour=1), "unknown key 'colour'"),
        (lambda d: d.pop("width"), "missing key 'width'"),
        (lambda d: d.update(width="wide"), "width must be int"),
        (lambda d: d["stage1"]["head"]["layers"][-1].update(out=2), "last layer must have out 1"),
        (
            lambda d: d["stage1"]["cells"].append({"type": "multiscale", "ops": ["skip"]}),
            "multiple 1 must be",
        ),
        (lambda d: d.update(stage2={"branches": [], "merge": "mask", "head": {}}), "exactly two branches"),
        (
            lambda d: d["stage1"]["head"].update(output="none", activity={}),
            "activity needs output 'select'",
        ),
        (lambda d: d["stage1"]["head"].update(activity={"window": 8}), "activity: window must be odd, got 8"),
        (lambda d: d["stage1"]["head"].update(activity={"gain": -1}), "activity: gain must be a finite"),
        (lambda d: d["stage1"]["head"].update(activity={"size": 3}), "activity: unknown key 'size'"),
    ],
)
def test_invalid_genotypes_are_user_errors(edit, expected):
    data = _compact_dict()
    edit(data)
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        Genotype.from_dict(data)


def test_select_head_blends_the_sources_per_pixel():
    data = _compact_dict()
    data["stage1"]["head"]["output"] = "select"
    data["stage1"]["head"].pop("activity", None)
    network = FusionNetwork(Genotype.from_dict(data)).eval()
    a, b = torch.rand(2, 1, 37, 45), torch.rand(2, 1, 37, 45)
    with torch.no_grad():
        fused = network.fuse(a, b)
        logits = network.stage1.head(_features(network, a, b))
    weight = (logits + 0.5).clamp(0, 1)
    torch.testing.assert_close(fused, weight * a + (1 - weight) * b)
    assert (fused >= torch.minimum(a, b) - 1e-6).all() and (fused <= torch.maximum(a, b) + 1e-6).all()


def test_activity_head_starts_as_the_activity_rule_and_is_antisymmetric():
    """At initialisation the decision is the activity loss's own map; swapping the sources flips it."""
    from timfusion.tasks.losses import ActivityLoss

    data = _compact_dict()
    data["stage1"]["head"]["activity"] = {}
    network = FusionNetwork(Genotype.from_dict(data)).eval()
    a, b = _textured_pair(96, 128)
    with torch.no_grad():
        fused = network.fuse(a, b)
        swapped = network.fuse(b, a)
    torch.testing.assert_close(fused, swapped, atol=1e-5, rtol=0)  # same image either way round
    rule = ActivityLoss().decision_map(a, b) > 0.5
    from_a = (fused - a).abs() < (fused - b).abs()
    differ = (a - b).abs() > 0.05
    assert (from_a == rule)[differ].float().mean() > 0.9


def test_activity_head_gradients_reach_the_activity_filters():
    data = _compact_dict()
    data["stage1"]["head"]["activity"] = {"channels": 2, "kernel": 5, "window": 9}
    network = FusionNetwork(Genotype.from_dict(data))
    a, b = _textured_pair(48, 40)
    network.fuse(a, b).mean().backward()
    activity = network.stage1.head.activity
    assert activity.phi.weight.shape == (2, 1, 5, 5)
    assert activity.phi.weight.grad.abs().sum() > 0 and activity.mix.weight.grad.abs().sum() > 0
    assert network.stage1.head[2].weight.grad.abs().sum() > 0  # the learned correction (zero at start)


def _textured_pair(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` textured on the left half, ``b`` on the right, both flat elsewhere."""
    noise = torch.rand(2, 1, 1, h, w, generator=torch.Generator().manual_seed(3))
    left = torch.zeros(1, 1, h, w)
    left[..., : w // 2] = 1.0
    a = 0.3 + 0.4 * noise[0] * left
    b = 0.6 + 0.3 * noise[1] * (1 - left)
    return a, b


def test_decision_weight_reaches_the_sources_and_keeps_its_gradient():
    from timfusion.search_spaces.network import decision_weight

    logit = torch.tensor([-3.0, -0.5, 0.0, 0.25, 0.5, 4.0], requires_grad=True)
    weight = decision_weight(logit)
    torch.testing.assert_close(weight.detach(), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))
    weight.sum().backward()
    torch.testing.assert_close(logit.grad, torch.ones(6))  # saturated regions can still move back


def _features(network: FusionNetwork, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = network.stage1.stem(torch.cat((a, b), 1))
    for cell in network.stage1.cells:
        x = cell(x)
    return x


def test_select_is_refused_on_an_auxiliary_head():
    data = json.loads(load_genotype("tim_ivif").to_json())
    data["stage2"]["aux_head"]["output"] = "select"
    with pytest.raises(UserError, match="aux_head: output 'select' needs both sources"):
        Genotype.from_dict(data)


def test_unknown_genotype_name_lists_the_named_ones(tmp_path):
    with pytest.raises(UserError, match="unknown genotype; named genotypes: .*compact.*tim_ivif"):
        load_genotype("nope")
    path = tmp_path / "mine.json"
    path.write_text(load_genotype("tim_light").to_json().replace('"tim_light"', '"mine"'))
    assert load_genotype(path).name == "mine"
    path.write_text("{broken")
    with pytest.raises(UserError, match="mine.json: not valid JSON"):
        load_genotype(path)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes_are_reproduced(models, name):
    params, macs = PUBLISHED[name]
    assert count_parameters(models[name]) == pytest.approx(params, rel=0.05)
    assert count_macs(models[name], 256, 256) == pytest.approx(macs, rel=0.05)


def test_published_stage_split_is_reproduced(models):
    model = models["tim_ivif"]
    profile = mac_profile(model, 256, 256)
    stage1 = sum(v for k, v in profile.items() if k.startswith("stage1."))
    assert count_parameters(model.stage1) == pytest.approx(995e3, rel=0.05)
    assert stage1 == pytest.approx(17.9e9, rel=0.05)
    assert count_parameters(model.stage2) == pytest.approx(237e3, rel=0.05)
    assert sum(profile.values()) - stage1 == pytest.approx(15.5e9, rel=0.05)


def test_inference_skips_only_the_auxiliary_heads(models):
    model = models["tim_ivif"]
    profile = mac_profile(model, 64, 64)
    aux = sum(v for k, v in profile.items() if ".aux." in k)
    assert aux > 0 and count_macs(model, 64, 64, full=False) == sum(profile.values()) - aux


@pytest.mark.parametrize("name", GENOTYPES())
def test_size_report_parts_add_up(models, name):
    model = models[name]
    profile = mac_profile(model, 64, 48)
    rows = size_report(model, 64, 48, profile)
    assert sum(r[2] for r in rows) == count_parameters(model)
    assert sum(r[3] for r in rows) == sum(profile.values())


@pytest.mark.parametrize("name", ["tim_ivif", "compact"])
def test_shape_only_mac_count_equals_a_real_pass(models, name):
    model = models[name]
    x = torch.zeros(1, 1, 24, 32)
    assert mac_profile(model, 24, 32) == mac_profile(model, 24, 32, inputs=(x, x))
    assert not model.training


def test_compact_is_compact(models):
    assert count_parameters(models["compact"]) <= 150_000
    assert count_macs(models["compact"], 480, 640) < 4e9


@pytest.mark.slow


def test_injected_op_factory_reaches_every_cell_position():
    calls = []

    def make_op(place, position, channels):
        calls.append((place, position, channels))
        return torch.nn.Identity()

    model = FusionNetwork("tim_ivif", make_op=make_op)
    assert {place for place, _, _ in calls} == {place for place, _ in model.genotype.cells()}
    assert len(model.op_slots()) == len(calls)
    assert ("stage1.cells.0", 1, 192) in calls  # multiscale: position 1 at 4C
    with torch.no_grad():
        assert model(*_pair(8, 8)).shape == (1, 1, 8, 8)


def test_arch_show_prints_parameters_and_macs(cli):
    import timfusion.platform.jobs.arch  # noqa: F401  (registers the command until load_all does)

    code, out, err = cli("arch", "show", "genotype=compact", "size=[64,48]")
    assert code == 0, err
    params = count_parameters(FusionNetwork("compact"))
    assert f"{params:,} parameters" in out and "GMAC" in out and "at 64x48" in out
    assert "res_3x3 @ C=16" in out and "stage1.cells.2" in out


def test_arch_show_refuses_an_unknown_genotype(cli):
    import timfusion.platform.jobs.arch  # noqa: F401

    code, _, err = cli("arch", "show", "genotype=nope")
    assert code == 2 and "named genotypes: compact" in err and len(err.strip().splitlines()) == 1
    for size in ("[0,4]", "[64.5,64]"):
        code, _, err = cli("arch", "show", f"size={size}")
        assert code == 2 and "size: expected [height, width] of integers >= 1" in err, err
