"""Hypergradient methods against the exact hypergradient of a ridge regression.

Lower level: ``w*(alpha) = argmin_w mean (X w - y)^2 + sum_i exp(alpha_i) w_i^2`` (closed
form); upper level: the validation error ``F = mean (X_v w* - y_v)^2``. The exact
``dF/dalpha`` differentiates through the closed-form solve. :class:`TestConformance`
runs every registered method; a new method is tested by registering it.
"""

from __future__ import annotations

import pytest
import torch

from timfusion.platform.errors import UserError
from timfusion.search_spaces.hypergrad import HYPERGRADS, Hypergradient, build_hypergrad


class Ridge:
    """A ridge problem with per-feature regularisation strengths ``exp(alpha)``."""

    def __init__(self, n: int = 60, d: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        truth = torch.randn(d, generator=gen, dtype=torch.float64)
        self.x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.y = self.x @ truth + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        self.x_val = torch.randn(n, d, generator=gen, dtype=torch.float64)
        self.y_val = self.x_val @ truth + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        self.alpha = torch.full((d,), -1.0, dtype=torch.float64, requires_grad=True)
        self.w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        with torch.no_grad():
            self.w.copy_(self.solve(self.alpha))

    def hessian(self, alpha: torch.Tensor) -> torch.Tensor:
        n = self.x.shape[0]
        return 2 * self.x.T @ self.x / n + 2 * torch.diag(torch.exp(alpha))

    def solve(self, alpha: torch.Tensor) -> torch.Tensor:
        n = self.x.shape[0]
        return torch.linalg.solve(self.hessian(alpha), 2 * self.x.T @ self.y / n)

    def lower(self) -> torch.Tensor:
        return ((self.x @ self.w - self.y) ** 2).mean() + (torch.exp(self.alpha) * self.w**2).sum()

    def upper(self) -> torch.Tensor:
        return ((self.x_val @ self.w - self.y_val) ** 2).mean()

    def exact(self) -> torch.Tensor:
        alpha = self.alpha.detach().clone().requires_grad_(True)
        w = self.solve(alpha)
        (grad,) = torch.autograd.grad(((self.x_val @ w - self.y_val) ** 2).mean(), alpha)
        return grad

    def largest_curvature(self) -> float:
        return float(torch.linalg.eigvalsh(self.hessian(self.alpha.detach())).max())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def _options(name: str, problem: Ridge) -> dict:
    """Each method at a step size its lower level would use: half the stable SGD step."""
    return {"weight_lr": 1.0 / problem.largest_curvature()}


@pytest.mark.parametrize("name", HYPERGRADS.names())
class TestConformance:
    """What every hypergradient method must do."""

    def test_returns_one_finite_detached_tensor_per_alpha(self, name):
        problem = Ridge()
        method = build_hypergrad(name, **_options(name, problem))
        assert isinstance(method, Hypergradient) and method.name == name
        grads = method(problem.upper, problem.lower, [problem.w], [problem.alpha])
        assert len(grads) == 1 and grads[0].shape == problem.alpha.shape
        assert torch.isfinite(grads[0]).all() and not grads[0].requires_grad

    def test_leaves_the_weights_and_alphas_as_they_were(self, name):
        problem = Ridge()
        w, alpha = problem.w.detach().clone(), problem.alpha.detach().clone()
        method = build_hypergrad(name, **_options(name, problem))
        method(problem.upper, problem.lower, [problem.w], [problem.alpha])
        assert torch.equal(problem.w.detach(), w) and torch.equal(problem.alpha.detach(), alpha)

    def test_is_deterministic(self, name):
        problem = Ridge()
        method = build_hypergrad(name, **_options(name, problem))
        first = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
        second = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
        torch.testing.assert_close(first, second)

    def test_cosine_with_the_exact_hypergradient_is_reported(self, name, capsys):
        problem = Ridge()
        method = build_hypergrad(name, **_options(name, problem))
        grad = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
        cosine = _cosine(grad, problem.exact())
        with capsys.disabled():
            print(f"\n[hypergrad] {name}: cosine with the exact ridge hypergradient {cosine:+.4f}")
        assert -1.0 - 1e-9 <= cosine <= 1.0 + 1e-9

    def test_unknown_options_are_a_user_error(self, name):
        with pytest.raises(UserError, match=f"hypergradient {name}: bad options"):
            build_hypergrad(name, no_such_option=1)


@pytest.mark.parametrize("solver, terms", [("cg", 8), ("neumann", 400)])
def test_implicit_with_enough_terms_matches_the_exact_hypergradient(solver, terms):
    problem = Ridge()
    method = build_hypergrad(
        "implicit", weight_lr=1.0 / problem.largest_curvature(), solver=solver, terms=terms, tol=1e-24
    )
    grad = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
    assert _cosine(grad, problem.exact()) >= 0.99
    if solver == "cg":  # CG is exact in d steps on a d-dimensional quadratic
        torch.testing.assert_close(grad, problem.exact(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("solver, terms", [("cg", 3), ("neumann", 5)])
def test_finite_difference_products_match_the_exact_ones(solver, terms):
    """On a quadratic lower level central differences are exact: both product modes agree."""
    problem = Ridge()
    lr = 1.0 / problem.largest_curvature()
    grads = {
        hvp: build_hypergrad("implicit", weight_lr=lr, solver=solver, terms=terms, hvp=hvp)(
            problem.upper, problem.lower, [problem.w], [problem.alpha]
        )[0]
        for hvp in ("exact", "finite_difference")
    }
    torch.testing.assert_close(grads["finite_difference"], grads["exact"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("solver, terms", [("cg", 8), ("neumann", 400)])
def test_damping_solves_the_proximal_system(solver, terms):
    """With ``damping`` the correction is ``M (H + damping I)^-1 dF/dw``, checked against a dense solve."""
    problem = Ridge()
    damping = 0.7
    hessian = problem.hessian(problem.alpha.detach())
    (g_upper,) = torch.autograd.grad(problem.upper(), problem.w)
    mixed = torch.diag(2 * torch.exp(problem.alpha.detach()) * problem.w.detach())  # d2f/dalpha dw
    damped = hessian + damping * torch.eye(len(hessian), dtype=hessian.dtype)
    expected = -mixed @ torch.linalg.solve(damped, g_upper)
    method = build_hypergrad(
        "implicit", weight_lr=1.0 / (problem.largest_curvature() + damping), solver=solver, terms=terms,
        tol=1e-24, damping=damping,
    )
    grad = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-9)
    assert _cosine(grad, problem.exact()) < 1 - 1e-6  # damping changes the answer, as it should


def test_cg_stops_at_non_positive_curvature():
    """On a concave lower level the first CG direction has negative curvature: no correction
    (plain CG would step to the saddle, -g_F, and return a hypergradient of g_F)."""
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def lower():
        return -0.5 * (w**2).sum() + (alpha * w).sum()

    def upper():
        return ((w - 1) ** 2).sum()

    for hvp in ("exact", "finite_difference"):
        method = build_hypergrad("implicit", weight_lr=0.1, solver="cg", terms=3, hvp=hvp)
        grad = method(upper, lower, [w], [alpha])[0]
        assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))


def test_neumann_error_shrinks_with_more_terms():
    problem = Ridge()
    exact = problem.exact()
    errors = []
    for terms in (1, 10, 100):
        method = build_hypergrad("implicit", weight_lr=1.0 / problem.largest_curvature(), terms=terms)
        grad = method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
        errors.append(float((grad - exact).norm()))
    assert errors[0] > errors[1] > errors[2]


def test_first_order_sees_no_hypergradient_when_the_upper_loss_ignores_alpha():
    problem = Ridge()
    grad = build_hypergrad("first_order")(problem.upper, problem.lower, [problem.w], [problem.alpha])[0]
    assert torch.equal(grad, torch.zeros_like(grad))


def test_tim_sign_is_checked_and_both_signs_are_measured(capsys):
    problem = Ridge()
    exact = problem.exact()
    lr = 1.0 / problem.largest_curvature()
    cosines = {}
    for sign in (-1, 1):
        method = build_hypergrad("tim", weight_lr=lr, sign=sign)
        cosines[sign] = _cosine(method(problem.upper, problem.lower, [problem.w], [problem.alpha])[0], exact)
    with capsys.disabled():
        print(f"\n[hypergrad] tim sign -1 (IFT): {cosines[-1]:+.4f}, +1 (public code): {cosines[1]:+.4f}")
    with pytest.raises(UserError, match="sign must be -1"):
        build_hypergrad("tim", sign=0.5)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("implicit", {"solver": "lu"}, "solver must be 'neumann' or 'cg'"),
        ("implicit", {"terms": 0}, "terms must be >= 1"),
        ("implicit", {"hvp": "bfgs"}, "hvp must be 'exact' or 'finite_difference'"),
        ("implicit", {"epsilon": 0.0}, "epsilon must be > 0"),
        ("implicit", {"damping": -1.0}, "damping must be >= 0"),
        ("darts", {"weight_lr": 0.0}, "weight_lr must be > 0"),
    ],
)
def test_bad_settings_are_user_errors(name, options, expected):
    with pytest.raises(UserError, match=expected):
        build_hypergrad(name, **options)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(UserError, match="known: darts, first_order, implicit, tim"):
        build_hypergrad("reinforce")
