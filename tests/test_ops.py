"""Every registered operation and cell: shape, gradients, parameter formula, eval semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timfusion.platform.errors import UserError
from timfusion.search_spaces.cells import CELLS, OpSlot
from timfusion.search_spaces.ops import OPS

C = 8
OP_SIZES = [(8, 8), (7, 11), (13, 5), (1, 3)]
CELL_SIZES = [(8, 8), (12, 20), (4, 16)]
CELL_OPS = ("res_3x3", "dil_conv_3x3")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Small tensors: one thread avoids OpenMP barrier stalls on a busy 2-core machine."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_gradients(module: nn.Module, out: torch.Tensor, x: torch.Tensor) -> None:
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, param in module.named_parameters():
        assert param.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient at {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient at {name}"


def _check_eval_determinism(module: nn.Module, x: torch.Tensor) -> None:
    module.train()
    with torch.no_grad():
        module(x)  # move the BN running statistics off their initial values
    module.eval()
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        first, second = module(x), module(x)
    assert torch.equal(first, second)
    for key, value in module.state_dict().items():
        assert torch.equal(value, buffers[key]), f"{key} changed by an eval forward"
    with torch.no_grad():  # eval output does not depend on the rest of the batch
        alone = module(x[:1])
    torch.testing.assert_close(alone, first[:1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- operations


@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize("size", OP_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_op_keeps_shape(name, size):
    op = OPS.get(name)(C)
    x = torch.randn(2, C, *size)
    assert op(x).shape == x.shape
    assert op.eval()(x).shape == x.shape


@pytest.mark.parametrize("name", OPS.names())
def test_op_gradients_reach_every_parameter(name):
    op = OPS.get(name)(C).train()
    x = torch.randn(2, C, 9, 10, requires_grad=True)
    _check_gradients(op, op(x), x)


@pytest.mark.parametrize("name", OPS.names())
@pytest.mark.parametrize("channels", [4, 8, 16, 48])
def test_op_parameter_count_matches_its_formula(name, channels):
    op = OPS.get(name)(channels)
    assert sum(p.numel() for p in op.parameters()) == OPS.meta(name)["params"](channels)


@pytest.mark.parametrize("name", OPS.names())
def test_op_eval_is_deterministic_and_keeps_running_stats(name):
    _check_eval_determinism(OPS.get(name)(C), torch.randn(3, C, 9, 7))


def test_unknown_op_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown operation 'nope'; known: .*res_3x3"):
        OPS.get("nope")


# ----------------------------------------------------------------------------- cells


@pytest.mark.parametrize("name", CELLS.names())
@pytest.mark.parametrize("size", CELL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cell_keeps_shape(name, size):
    assert all(side % CELLS.meta(name)["multiple"] == 0 for side in size)
    cell = CELLS.get(name)(C, CELL_OPS)
    x = torch.randn(2, C, *size)
    assert cell(x).shape == x.shape


@pytest.mark.parametrize("name", CELLS.names())
def test_cell_gradients_reach_every_parameter(name):
    cell = CELLS.get(name)(C, CELL_OPS).train()
    x = torch.randn(2, C, 8, 12, requires_grad=True)
    _check_gradients(cell, cell(x), x)


@pytest.mark.parametrize("cell_name", CELLS.names())
@pytest.mark.parametrize("op_name", OPS.names())
def test_cell_parameter_count_matches_its_formula(cell_name, op_name):
    ops = (op_name, "res_3x3")
    cell = CELLS.get(cell_name)(C, ops)
    assert sum(p.numel() for p in cell.parameters()) == CELLS.meta(cell_name)["params"](C, ops)


@pytest.mark.parametrize("name", CELLS.names())
def test_cell_eval_is_deterministic_and_keeps_running_stats(name):
    _check_eval_determinism(CELLS.get(name)(C, CELL_OPS), torch.randn(3, C, 8, 8))


@pytest.mark.parametrize("name", CELLS.names())
def test_cell_builds_each_position_with_the_injected_factory(name):
    calls: list[tuple[int, int]] = []

    class Tagged(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

        def forward(self, x):
            return x * self.scale

    def make_op(position: int, channels: int) -> nn.Module:
        calls.append((position, channels))
        return Tagged(channels)

    cell = CELLS.get(name)(C, ("mixed", "mixed", "mixed"), make_op=make_op)
    slots = cell.op_slots()
    assert sorted(calls) == sorted((s.position, s.channels) for s, _ in slots)
    assert [s.position for s, _ in slots] == sorted(s.position for s, _ in slots)  # in order
    assert {s.position for s, _ in slots} == {0, 1, 2}
    assert all(isinstance(op, Tagged) and op.scale.shape[1] == s.channels for s, op in slots)
    assert all(isinstance(s, OpSlot) and s.channels == C * s.scale for s, _ in slots)
    x = torch.randn(2, C, 8, 8)
    assert cell(x).shape == x.shape


def test_cell_default_factory_names_unknown_ops():
    with pytest.raises(UserError, match="unknown operation 'foo'"):
        CELLS.get("chain")(C, ("res_3x3", "foo"))
