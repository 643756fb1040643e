"""Hypergradients of the bilevel architecture search: ``dF/dalpha`` at ``w ~ argmin_w f(w, alpha)``.

``f`` is the lower (training) loss of the network weights ``w``, ``F`` the upper
(validation) objective; both depend on the architecture weights ``alpha``. The exact
hypergradient (implicit function theorem, at a lower-level optimum) is

    dF/dalpha = dF/dalpha|_direct - d2f/dalpha dw [d2f/dw2]^-1 dF/dw

Every method approximates it from the two loss closures and the current parameters;
one class per method, registered in :data:`HYPERGRADS` under the ``hypergrad=`` name:

* ``first_order`` — the direct term only (DARTS first order).
* ``darts`` — DARTS second order: one virtual SGD step ``w' = w - xi df/dw``, then
  ``dF/dalpha(w') - xi d2f/dalpha dw dF/dw'``, the mixed product by central finite
  differences of ``df/dalpha`` at ``w +- eps v`` (Liu, Simonyan, Yang 2019).
* ``implicit`` — the IFT formula with ``[d2f/dw2]^-1 dF/dw`` solved from exact
  Hessian-vector products: a truncated Neumann series ``eta sum_k (I - eta H)^k v``
  (Lorraine et al. 2020) or conjugate gradient (Rajeswaran et al. 2019), ``terms``
  iterations; Hessian-vector and mixed products by double backward or by finite
  differences (``hvp=``).
* ``tim`` — TIM's rank-one approximation (``../shared/REFERENCE.md``): with ``g_F = dF/dw``,
  ``g_f = df/dw`` and the constant ``c = <g_F, g_f> / <g_f, g_f>``, the direction is
  ``dF/dalpha + sign * eta * c * df/dalpha``. Sign: the public TIM code adds the term
  (``sign=+1``); we default to ``sign=-1``, the sign the IFT gives. Derivation: with the
  Gauss-Newton approximations ``d2f/dw2 ~ g_f g_f^T / eta_h`` (restricted to ``g_f``'s
  direction) and ``d2f/dalpha dw ~ df/dalpha g_f^T``, the IFT correction is
  ``- df/dalpha g_f^T [g_f g_f^T]^+ g_F ~ - c df/dalpha`` times a step size, i.e. it is
  subtracted. The ridge test in ``tests/test_hypergrad.py`` measures both signs against
  the exact hypergradient (figures in ``benchmarks/RESULTS.md``).

A new method subclasses :class:`Hypergradient`, registers with ``@HYPERGRADS.register``
and must pass ``tests/test_hypergrad.py``'s conformance class, which runs every
registered method.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from timfusion.platform.errors import UserError
from timfusion.platform.registry import Registry

Loss = Callable[[], Tensor]
"""A closure evaluating a loss at the current parameters (a scalar with a graph)."""

Products = Callable[[Sequence[Tensor]], tuple[list[Tensor], list[Tensor]]]
"""``v -> (d2f/dw2 v, d2f/dalpha dw v)``: the lower loss's second-order products with ``v``."""

HYPERGRADS: Registry[type[Hypergradient]] = Registry("hypergradient method")


def _grads(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    return sum(((x * y).sum() for x, y in zip(xs, ys, strict=True)), torch.zeros(()))


def _norm(xs: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(_dot(xs, xs))


def _restore(weights: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for w, value in zip(weights, values, strict=True):
            w.copy_(value)


def _central_difference(
    lower: Loss,
    weights: Sequence[Tensor],
    base: Sequence[Tensor],
    v: Sequence[Tensor],
    wrt: Sequence[Tensor],
    epsilon: float,
) -> list[Tensor]:
    """``d2f/d(wrt) dw v`` at ``w = base``: central differences of ``df/d(wrt)`` at
    ``base +- eps v`` with ``eps = epsilon / |v|`` (DARTS' step); the weights end at ``base``."""
    eps = epsilon / (float(_norm(v)) + 1e-12)
    sides = []
    try:
        for scale in (eps, -eps):
            _restore(weights, [b + scale * d for b, d in zip(base, v, strict=True)])
            sides.append(_grads(lower(), wrt))
    finally:
        _restore(weights, base)
    return [(p - m) / (2 * eps) for p, m in zip(*sides, strict=True)]


class Hypergradient(abc.ABC):
    """Approximates ``dF/dalpha``; the weights are left as they were found.

    ``weight_lr`` is the lower level's learning rate (``eta``, ``xi``): the methods that
    stand a step or a step size in for the inverse Hessian use it.
    """

    name: str = ""

    def __init__(self, weight_lr: float = 0.01) -> None:
        if not weight_lr > 0:
            raise UserError(f"hypergradient {self.name}: weight_lr must be > 0, got {weight_lr}")
        self.weight_lr = float(weight_lr)

    @abc.abstractmethod
    def __call__(
        self, upper: Loss, lower: Loss, weights: Sequence[Tensor], alphas: Sequence[Tensor]
    ) -> list[Tensor]:
        """``dF/dalpha``, one tensor per ``alphas`` entry, with no graph attached."""


@HYPERGRADS.register("first_order")
class FirstOrder(Hypergradient):
    """The direct term ``dF/dalpha`` only: cheapest, ignores how ``w`` follows ``alpha``."""

    name = "first_order"

    def __call__(self, upper, lower, weights, alphas):
        return _grads(upper(), alphas)


@HYPERGRADS.register("darts")
class DartsSecondOrder(Hypergradient):
    """DARTS' unrolled one-step hypergradient, finite-difference mixed product."""

    name = "darts"

    def __init__(self, weight_lr: float = 0.01, epsilon: float = 0.01) -> None:
        super().__init__(weight_lr)
        self.epsilon = epsilon

    def __call__(self, upper, lower, weights, alphas):
        saved = [w.detach().clone() for w in weights]
        xi = self.weight_lr
        try:
            step = _grads(lower(), weights)
            with torch.no_grad():
                for w, g in zip(weights, step, strict=True):
                    w.sub_(xi * g)
            loss = upper()
            direct_and_v = _grads(loss, [*alphas, *weights])
            direct, v = direct_and_v[: len(alphas)], direct_and_v[len(alphas) :]
            mixed = _central_difference(lower, weights, saved, v, alphas, self.epsilon)
        finally:
            _restore(weights, saved)
        return [d - xi * m for d, m in zip(direct, mixed, strict=True)]


@HYPERGRADS.register("implicit")
class Implicit(Hypergradient):
    """IFT hypergradient; ``[d2f/dw2]^-1 dF/dw`` by ``solver`` (``neumann`` or ``cg``), ``terms`` steps.

    Neumann: ``p = eta sum_{k=0}^{terms} (I - eta H)^k g_F``, convergent when ``eta`` <
    2 / (largest eigenvalue of H). CG: ``terms`` conjugate-gradient iterations on ``H p = g_F``,
    stopped early below ``tol``, and truncated at the first direction of non-positive
    curvature (Steihaug): away from a strict minimum a supernet's Hessian is indefinite, and
    a CG step along ``d`` with ``d^T H d`` near or below zero is unbounded, which made the
    correction swamp the direct term with noise (measured: cosine between the direct term
    and the hypergradient from -0.64 to +0.68 over a search). ``damping`` solves
    ``(H + damping I) p = g_F`` instead (both solvers): the proximal lower level of iMAML
    (Rajeswaran et al. 2019), which bounds ``p`` by ``|g_F| / damping`` where H is positive
    semi-definite.

    Each second-order product gives ``d2f/dw2 d`` and ``d2f/dalpha dw d`` together, so the
    mixed term of ``p``, a linear combination of the products' directions, costs nothing
    more for CG and one product more for Neumann. ``hvp="exact"`` takes them by double
    backward; ``hvp="finite_difference"`` by central differences of ``df/d(w, alpha)`` at
    ``w +- eps d`` (``eps = epsilon / |d|``, as DARTS): two plain backward passes instead of a
    double backward, exact on quadratics and much cheaper on a supernet.
    """

    name = "implicit"

    def __init__(
        self,
        weight_lr: float = 0.01,
        terms: int = 10,
        solver: str = "neumann",
        tol: float = 1e-10,
        hvp: str = "exact",
        epsilon: float = 0.01,
        damping: float = 0.0,
    ) -> None:
        super().__init__(weight_lr)
        if solver not in ("neumann", "cg"):
            raise UserError(f"hypergradient implicit: solver must be 'neumann' or 'cg', got {solver!r}")
        if hvp not in ("exact", "finite_difference"):
            raise UserError(
                f"hypergradient implicit: hvp must be 'exact' or 'finite_difference', got {hvp!r}"
            )
        if terms < 1:
            raise UserError(f"hypergradient implicit: terms must be >= 1, got {terms}")
        if not epsilon > 0:
            raise UserError(f"hypergradient implicit: epsilon must be > 0, got {epsilon}")
        if not damping >= 0:
            raise UserError(f"hypergradient implicit: damping must be >= 0, got {damping}")
        self.terms, self.solver, self.tol = terms, solver, tol
        self.hvp, self.epsilon, self.damping = hvp, float(epsilon), float(damping)

    def __call__(self, upper, lower, weights, alphas):
        both = _grads(upper(), [*alphas, *weights])
        direct, g_upper = both[: len(alphas)], both[len(alphas) :]
        products = (
            self._exact_products(lower, weights, alphas)
            if self.hvp == "exact"
            else self._difference_products(lower, weights, alphas)
        )
        if self.damping > 0:
            products = self._damped(products, self.damping)
        solve = self._neumann if self.solver == "neumann" else self._cg
        mixed = solve(products, [g.detach() for g in g_upper], alphas)
        return [d - m for d, m in zip(direct, mixed, strict=True)]

    @staticmethod
    def _exact_products(lower: Loss, weights: Sequence[Tensor], alphas: Sequence[Tensor]) -> Products:
        g_lower = _grads(lower(), weights, create_graph=True)
        live = [i for i, g in enumerate(g_lower) if g.requires_grad]  # weights f's gradient depends on
        params = [*weights, *alphas]

        def products(v: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
            if not live:
                return [torch.zeros_like(x) for x in v], [torch.zeros_like(a) for a in alphas]
            grads = torch.autograd.grad(
                [g_lower[i] for i in live],
                params,
                grad_outputs=[v[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            out = [
                torch.zeros_like(p) if g is None else g.detach()
                for p, g in zip(params, grads, strict=True)
            ]
            return out[: len(weights)], out[len(weights) :]

        return products

    def _difference_products(
        self, lower: Loss, weights: Sequence[Tensor], alphas: Sequence[Tensor]
    ) -> Products:
        saved = [w.detach().clone() for w in weights]
        params = [*weights, *alphas]

        def products(v: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
            out = _central_difference(lower, weights, saved, v, params, self.epsilon)
            return out[: len(weights)], out[len(weights) :]

        return products

    @staticmethod
    def _damped(products: Products, damping: float) -> Products:
        """The products of ``H + damping I`` (the mixed product is unchanged)."""

        def damped(v: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
            h, m = products(v)
            return [hx + damping * x for hx, x in zip(h, v, strict=True)], m

        return damped

    def _neumann(self, products: Products, v: list[Tensor], alphas: Sequence[Tensor]) -> list[Tensor]:
        eta = self.weight_lr
        term = [x.clone() for x in v]
        mixed = [torch.zeros_like(a) for a in alphas]
        for k in range(self.terms + 1):
            h, m = products(term)
            mixed = [s + eta * mk for s, mk in zip(mixed, m, strict=True)]
            if k < self.terms:
                term = [t - eta * hx for t, hx in zip(term, h, strict=True)]
        return mixed

    def _cg(self, products: Products, v: list[Tensor], alphas: Sequence[Tensor]) -> list[Tensor]:
        r = [t.clone() for t in v]
        d = [t.clone() for t in v]
        mixed = [torch.zeros_like(a) for a in alphas]
        rr = _dot(r, r)
        for _ in range(self.terms):
            if float(rr) <= self.tol:
                break
            hd, md = products(d)
            curvature = _dot(d, hd)
            if float(curvature) <= 0:
                break  # non-positive curvature: keep the solution so far (truncated CG)
            step = rr / curvature
            mixed = [s + step * mk for s, mk in zip(mixed, md, strict=True)]
            r = [ri - step * hi for ri, hi in zip(r, hd, strict=True)]
            rr_new = _dot(r, r)
            d = [ri + (rr_new / rr) * di for ri, di in zip(r, d, strict=True)]
            rr = rr_new
        return mixed


@HYPERGRADS.register("tim")
class TimRankOne(Hypergradient):
    """TIM's rank-one hypergradient ``dF/dalpha + sign * eta * c * df/dalpha`` (module docstring)."""

    name = "tim"

    def __init__(self, weight_lr: float = 0.01, sign: float = -1.0) -> None:
        super().__init__(weight_lr)
        if sign not in (-1.0, 1.0, -1, 1):
            raise UserError(f"hypergradient tim: sign must be -1 (IFT) or +1 (public code), got {sign}")
        self.sign = float(sign)

    def __call__(self, upper, lower, weights, alphas):
        both_upper = _grads(upper(), [*alphas, *weights])
        direct, g_upper = both_upper[: len(alphas)], both_upper[len(alphas) :]
        both_lower = _grads(lower(), [*alphas, *weights])
        d_lower, g_lower = both_lower[: len(alphas)], both_lower[len(alphas) :]
        c = _dot(g_upper, g_lower) / (_dot(g_lower, g_lower) + 1e-12)
        scale = self.sign * self.weight_lr * float(c)
        return [d + scale * dl for d, dl in zip(direct, d_lower, strict=True)]


def build_hypergrad(name: str, **options) -> Hypergradient:
    """The registered method ``name`` with its options; bad options are a UserError naming them."""
    cls = HYPERGRADS.get(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise UserError(f"hypergradient {name}: bad options {options}: {err}") from None
