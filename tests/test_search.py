"""Search spaces, the supernet, derivation, expected cost and the bilevel search step."""

from __future__ import annotations

import json

import pytest
import torch

from timfusion.platform.errors import UserError
from timfusion.search_spaces.bilevel import BilevelSearch, SearchSettings, alpha_heatmap, derive_genotype
from timfusion.search_spaces.hypergrad import HYPERGRADS
from timfusion.search_spaces.network import FusionNetwork, count_macs
from timfusion.search_spaces.supernet import (
    SEARCH_SPACES,
    CostTable,
    Supernet,
    load_search_space,
    parse_search_space,
)
from timfusion.tasks.losses import FusionLoss

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 2, size: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, size, size, generator=gen)
    b = torch.rand(n, 1, size, size, generator=gen)
    a[..., :, : size // 2] = 0.4  # a flat on the left, b flat on the right: a real choice per pixel
    b[..., :, size // 2 :] = 0.6
    return {"a": a, "b": b}


def _loss() -> FusionLoss:
    return FusionLoss({"activity": 1.0, "intensity": 0.5}, activity={"window": 7})


def test_the_search_spaces_ship():
    assert {"tim", "small", "compact"} <= set(SEARCH_SPACES())


@pytest.mark.parametrize("name", SEARCH_SPACES())
def test_every_search_space_builds_a_supernet_whose_alphas_get_gradients(name):
    space = load_search_space(name)
    supernet = Supernet(space)
    assert len(supernet.arch_parameters()) == len(space.positions()) > 0
    batch = _batch(1, 32)
    opt = torch.optim.SGD(supernet.weights(), lr=0.1)  # one weight step: zero-initialised heads open up
    supernet(batch["a"], batch["b"]).mean().backward()
    opt.step()
    for alpha in supernet.arch_parameters():
        alpha.grad = None
    fused = supernet(batch["a"], batch["b"])
    assert fused.shape == batch["a"].shape
    fused.square().mean().backward()
    assert all(alpha.grad is not None and alpha.grad.abs().sum() > 0 for alpha in supernet.arch_parameters())


@pytest.mark.parametrize("name", SEARCH_SPACES())
def test_derived_genotypes_build_and_train(name):
    supernet = Supernet(load_search_space(name), init_scale=1.0, seed=3)
    genotype = supernet.derive(max_skips=1)
    ops = [op for _, cell in genotype.cells() for op in cell.ops]
    assert len(ops) == len(supernet.space.positions()) and ops.count("skip") <= 1
    network = FusionNetwork(genotype)
    batch = _batch(1, 32)
    network.fuse(batch["a"], batch["b"]).mean().backward()
    assert any(p.grad is not None for p in network.parameters())


def test_derivation_takes_the_argmax_and_caps_skips_by_margin():
    supernet = Supernet(load_search_space("small"))
    cands = supernet.space.candidates
    skip, res = cands.index("skip"), cands.index("res_3x3")
    with torch.no_grad():
        for i, alpha in enumerate(supernet.arch_parameters()):
            alpha.zero_()
            alpha[skip] = 2.0 + i  # every position prefers skip, the last one most
            alpha[res] = 1.5
    free = [op for _, c in supernet.derive().cells() for op in c.ops]
    assert free == ["skip"] * 4
    capped = [op for _, c in supernet.derive(max_skips=1).cells() for op in c.ops]
    assert capped == ["res_3x3", "res_3x3", "res_3x3", "skip"]  # the most confident skip stays


@pytest.mark.parametrize("name", SEARCH_SPACES())
def test_a_macs_budget_bounds_the_derived_network_and_keeps_alphas_choice_when_it_fits(name):
    supernet = Supernet(load_search_space(name), init_scale=1.0, seed=5)
    size = (64, 64)
    free = derive_genotype(supernet, SearchSettings(max_skips=1, cost_size=size), name="free")
    free_macs = count_macs(FusionNetwork(free), *size, full=False)
    roomy = derive_genotype(supernet, SearchSettings(max_skips=1, cost_size=size, max_macs=free_macs),
                            name="free")
    assert roomy.to_dict() == free.to_dict()
    space, table = supernet.space, CostTable(supernet, "macs", size)
    reference = {pos: space.candidates[0] for pos in space.positions()}
    fixed = count_macs(FusionNetwork(space.genotype(reference)), *size, full=False) - table.cost_of(
        reference, space.candidates
    )
    budget = free_macs - 0.3 * (free_macs - fixed)  # 30% of the searched ops' MACs less
    tight = derive_genotype(supernet, SearchSettings(max_skips=1, cost_size=size, max_macs=budget),
                            name="tight")
    ops = [op for _, cell in tight.cells() for op in cell.ops]
    assert count_macs(FusionNetwork(tight), *size, full=False) <= budget and ops.count("skip") <= 1


def test_an_unreachable_macs_budget_is_a_user_error_naming_it():
    supernet = Supernet(load_search_space("small"))
    with pytest.raises(UserError, match="no genotype of small costs at most"):
        derive_genotype(supernet, SearchSettings(max_skips=0, cost_size=(32, 32), max_macs=1.0), name="none")
    with pytest.raises(UserError, match="search.max_macs must be > 0"):
        SearchSettings.from_config({"max_macs": -5})


def test_expected_cost_is_the_softmax_weighted_op_cost_and_falls_when_optimised():
    supernet = Supernet(load_search_space("small"))
    table = CostTable(supernet, "params")
    with torch.no_grad():
        for alpha in supernet.arch_parameters():
            alpha.zero_()
    uniform = sum(float(c.mean()) for c in table.costs.values())
    assert float(supernet.expected_cost(table).detach()) == pytest.approx(uniform)
    skip = supernet.space.candidates.index("skip")
    assert all(float(c[skip]) == 0.0 for c in table.costs.values())
    opt = torch.optim.Adam(supernet.arch_parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        supernet.expected_cost(table).backward()
        opt.step()
    assert float(supernet.expected_cost(table).detach()) < 0.5 * uniform


def test_mac_costs_scale_with_the_input_area():
    supernet = Supernet(load_search_space("small"))
    small, large = CostTable(supernet, "macs", (32, 32)), CostTable(supernet, "macs", (64, 64))
    for key in small.costs:
        torch.testing.assert_close(large.costs[key], 4 * small.costs[key])


@pytest.mark.parametrize("method", HYPERGRADS.names())
def test_a_bilevel_search_moves_the_alphas_with_every_hypergradient(method):
    supernet = Supernet(load_search_space("small"))
    settings = SearchSettings(
        hypergrad=method,
        warmup_steps=1,
        alpha_lr=0.05,
        cost_weight=0.1,
        cost_size=(24, 24),
        hypergrad_options={"terms": 2} if method == "implicit" else {},
    )
    search = BilevelSearch(supernet, _loss(), settings)
    before = [a.detach().clone() for a in supernet.arch_parameters()]
    for step in range(3):
        logged = search.step(_batch(seed=step), _batch(seed=10 + step))
        assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    assert set(logged) >= {"loss/train", "loss/val", "cost"}
    assert logged["loss/val"] == pytest.approx(search.validate(_batch(seed=12)), rel=0.2)
    moved = [
        float((a.detach() - b).abs().max()) for a, b in zip(supernet.arch_parameters(), before, strict=True)
    ]
    assert max(moved) > 1e-4
    assert len(search.history) == 3 and search.history[0].shape == (4, len(supernet.space.candidates))


def test_alphas_stay_fixed_during_the_warm_up():
    supernet = Supernet(load_search_space("small"))
    search = BilevelSearch(supernet, _loss(), SearchSettings(hypergrad="first_order", warmup_steps=5))
    before = [a.detach().clone() for a in supernet.arch_parameters()]
    for step in range(3):
        logged = search.step(_batch(seed=step), _batch(seed=5))
        assert "loss/val" not in logged  # no upper step, no validation forward
    assert all(torch.equal(a.detach(), b) for a, b in zip(supernet.arch_parameters(), before, strict=True))


def test_guidance_trains_the_head_and_enters_both_levels():
    from timfusion.tasks.heads import SegmentationHead

    supernet = Supernet(load_search_space("small"))
    head = SegmentationHead(3, width=4)
    search = BilevelSearch(
        supernet,
        _loss(),
        SearchSettings(hypergrad="first_order", warmup_steps=0, guidance_weight=0.5),
        head=head,
    )
    batch = _batch()
    batch["label"] = torch.randint(0, 3, (2, 24, 24))
    before = [p.detach().clone() for p in head.parameters()]
    logged = search.step(batch, batch)
    assert "loss/head" in logged
    assert any(not torch.equal(p.detach(), b) for p, b in zip(head.parameters(), before, strict=True))


def test_search_state_round_trips():
    supernet = Supernet(load_search_space("small"))
    search = BilevelSearch(supernet, _loss(), SearchSettings(hypergrad="first_order", warmup_steps=0))
    search.step(_batch(), _batch(seed=1))
    state = search.state_dict()
    other = BilevelSearch(
        Supernet(load_search_space("small"), seed=7),
        _loss(),
        SearchSettings(hypergrad="first_order", warmup_steps=0),
    )
    other.load_state_dict(state)
    assert other.step_count == 1 and len(other.history) == 1
    for a, b in zip(other.supernet.arch_parameters(), supernet.arch_parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_alpha_heatmap_is_a_png():
    supernet = Supernet(load_search_space("small"))
    positions = [f"{place}:{pos}" for place, pos in supernet.space.positions()]
    png = alpha_heatmap([supernet.alpha_matrix().numpy()] * 2, supernet.space.candidates, positions)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(candidates=["res_3x3", "warp"]), "unknown operation 'warp'"),
        (lambda d: d.update(candidates=["res_3x3"]), "at least two op names"),
        (lambda d: d.update(candidates=["res_3x3", "res_3x3"]), "candidates repeat an op"),
        (lambda d: d["template"]["stage1"]["cells"][0].update(positions=0), "must give 'positions'"),
        (lambda d: d["template"]["stage1"]["cells"][0].update(positions=True), "must give 'positions'"),
        (lambda d: d["template"]["stage1"]["cells"][0].update(ops=["skip", "skip"]), "instead of ops"),
        (lambda d: d.update(depth=3), "unknown key 'depth'"),
        (lambda d: d["template"].update(width="wide"), "width must be int"),
    ],
)
def test_invalid_search_spaces_are_user_errors(edit, expected):
    import copy

    data = copy.deepcopy(
        {"name": "s", "candidates": ["res_3x3", "skip"], "template": load_search_space("small").template}
    )
    edit(data)
    with pytest.raises(UserError, match=expected):
        parse_search_space(data, "test space")


def test_unknown_search_space_lists_the_shipped_ones():
    with pytest.raises(UserError, match="known: .*small.*tim"):
        load_search_space("enormous")


def test_upper_every_spaces_the_alpha_steps_after_the_warm_up():
    supernet = Supernet(load_search_space("small"))
    settings = SearchSettings(hypergrad="first_order", warmup_steps=1, upper_every=3, alpha_lr=0.05)
    search = BilevelSearch(supernet, _loss(), settings)
    moved_at = []
    for step in range(8):
        before = [a.detach().clone() for a in supernet.arch_parameters()]
        search.step(_batch(seed=step), _batch(seed=20 + step))
        if any(not torch.equal(a.detach(), b)
               for a, b in zip(supernet.arch_parameters(), before, strict=True)):
            moved_at.append(step)
    assert moved_at == [1, 4, 7]


def test_the_cost_of_a_discrete_choice_is_the_expected_cost_of_its_one_hot_alphas():
    space = load_search_space("compact")
    supernet = Supernet(space)
    table = CostTable(supernet, "macs", (32, 32))
    choice = {pos: space.candidates[i % len(space.candidates)] for i, pos in enumerate(space.positions())}
    with torch.no_grad():
        for pos, alpha in zip(space.positions(), supernet.arch_parameters(), strict=True):
            alpha.fill_(-1e4)
            alpha[space.candidates.index(choice[pos])] = 0.0
    assert table.cost_of(choice, space.candidates) == pytest.approx(
        float(supernet.expected_cost(table).detach()))
    assert table.cost_of({pos: "skip" for pos in space.positions()}, space.candidates) == 0.0


def test_bad_search_settings_are_user_errors():
    with pytest.raises(UserError, match="search: unknown key 'alpha_rate'"):
        SearchSettings.from_config({"alpha_rate": 1.0})
    with pytest.raises(UserError, match="search.alpha_lr must be > 0"):
        SearchSettings.from_config({"alpha_lr": 0})
    with pytest.raises(UserError, match="search.upper_every must be >= 1"):
        SearchSettings.from_config({"upper_every": 0})
    with pytest.raises(UserError, match="unknown hypergradient method 'adjoint'"):
        BilevelSearch(Supernet(load_search_space("small")), _loss(), SearchSettings(hypergrad="adjoint"))


def test_a_run_takes_the_hypergradient_options_of_its_own_method():
    """One config serves every method Tune may draw: each takes its own options."""
    block = {"hypergrad": "implicit", "alpha_lr": 0.004,
             "hypergrad_options": {"implicit": {"terms": 2}, "tim": {"sign": 1.0}}}
    assert SearchSettings.for_run(block).hypergrad_options == {"terms": 2}
    tim = SearchSettings.for_run(block, {"hypergrad": "tim", "alpha_lr": 0.008})
    assert (tim.hypergrad, tim.hypergrad_options, tim.alpha_lr) == ("tim", {"sign": 1.0}, 0.008)
    assert SearchSettings.for_run(block, {"hypergrad": "first_order"}).hypergrad_options == {}
    assert SearchSettings.for_run({"hypergrad": "darts"}).hypergrad_options == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"terms": 2}, r"^search\.hypergrad_options\.terms: expected options under a hypergradient method "
                       r"\(darts, first_order, implicit, tim\), got the key 'terms'$"),
        ({"implicit": 5},
         r"^search\.hypergrad_options\.implicit: expected a mapping of implicit's options, got 5$"),
        # a method this run does not use is checked too: Tune may draw it in a later trial
        ({"tim": {"bogus": 1}}, r"^search\.hypergrad_options\.tim: hypergradient tim: bad options"),
        ([1], r"^search\.hypergrad_options: expected \{method: \{option: value\}\}, got \[1\]$"),
    ],
)
def test_bad_hypergradient_options_by_method_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        SearchSettings.for_run({"hypergrad": "implicit", "hypergrad_options": options})


def test_resizing_a_search_space_changes_width_and_cells():
    from timfusion.search_spaces.supernet import resize_search_space

    space = load_search_space("small")
    resized = resize_search_space(space, width=12, cells=3)
    genotype = resized.genotype({})
    assert genotype.width == 12 and genotype.stem_hidden == 12 and len(genotype.stage1) == 3
    assert len(resize_search_space(space, cells=1).positions()) == 2
    with pytest.raises(UserError, match="cells must be >= 1"):
        resize_search_space(space, cells=0)


def test_latency_costs_are_measured_once_per_device_and_cached(tmp_path, monkeypatch):
    import timfusion.search_spaces.supernet as supernet_module

    monkeypatch.setenv("TIMFUSION_CACHE", str(tmp_path))
    supernet = Supernet(load_search_space("small"))
    table = CostTable(supernet, "latency", (32, 32))
    skip = supernet.space.candidates.index("skip")
    conv = supernet.space.candidates.index("conv_3x3")
    for costs in table.costs.values():
        assert (costs > 0).all() and costs[conv] > costs[skip]
    cache = supernet_module.latency_cache_path(torch.device("cpu"))
    assert cache.parent.parent == tmp_path and len(json.loads(cache.read_text())) == 4

    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached latency was measured again")

    monkeypatch.setattr(supernet_module, "measure_latency", no_measuring)
    again = CostTable(supernet, "latency", (32, 32))
    for key in table.costs:
        torch.testing.assert_close(again.costs[key], table.costs[key])
