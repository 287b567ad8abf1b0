"""The exact oracle of the mathematics tests (DESIGN §7).

Training is written as a pure function of the initial weights, the initial optimizer state and
the hyperparameter tensors: one step is ``z' = rule.reference(w, ∇L_T(w), s, λ, flags)``, the
rules' out-of-place differentiable map, with the gradient taken by :func:`torch.func.grad` of a
functional loss.  The whole unrolled map is then differentiable by ``torch.func`` in float64,
which gives the exact hypergradient after any number of steps, the dense state Jacobian
``J = dU/dz`` and ``∂U/∂λ`` for the closed-form implicit-function-theorem hypergradient, and
exact Hessian-vector products (forward over reverse).  Central finite differences cross-check
the oracle itself.

Nothing here calls the package's closed-form products (``state_vjp``, ``hyper_vjp``) or its
hypergradient methods: the only package code the oracle runs is the rules' ``reference`` maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp

from hyperopt_optim import HyperOptimizer
from hyperopt_optim.rules import RuleState, UpdateRule

Loss = Callable[[Sequence[Tensor]], Tensor]
"""A loss as a pure function of the parameters (a sequence of tensors)."""

Learned = dict[str, Tensor | list[Tensor]]
"""One group's learned hyperparameters: a 0-dim tensor (one value for the group) or a list
with one tensor per parameter (0-dim: one per tensor; the parameter's shape: one per weight)."""


# --- problems --------------------------------------------------------------------------------


@dataclass
class Problem:
    """A training and a validation loss over a list of leaf parameters.

    ``train_loss`` and ``val_loss`` are pure functions of a sequence of parameter tensors, so
    the oracle can differentiate them with ``torch.func``; the closures evaluate them at the
    live ``params`` that the optimizer steps.
    """

    params: list[Tensor]
    train_loss: Loss
    val_loss: Loss
    module: nn.Module | None = None
    """The module whose forward the losses call (MLP problems), for a second oracle."""
    batches: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """``"train"`` and ``"val"``: the (inputs, targets) the losses use (MLP problems)."""

    def closure(self) -> Tensor:
        """The training loss, without ``backward()`` (the optimizer differentiates it)."""
        return self.train_loss(self.params)

    def torch_closure(self, opt: torch.optim.Optimizer) -> Callable[[], Tensor]:
        """torch's convention: zero the gradients, compute the loss, call ``backward()``."""

        def closure() -> Tensor:
            opt.zero_grad()
            loss = self.train_loss(self.params)
            loss.backward()
            return loss

        return closure

    def val_closure(self) -> Tensor:
        return self.val_loss(self.params)

    def train_grad(self, params: Sequence[Tensor]) -> list[Tensor]:
        """``∇L_T``, by ``torch.func.grad`` (composable with the oracle's transforms)."""
        return list(grad(lambda ps: self.train_loss(ps))(tuple(params)))


def mlp_problem(
    seed: int,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    hidden: int = 5,
) -> Problem:
    """A small tanh/softplus MLP (3 → hidden → 2), MSE on a training and a validation batch.

    Smooth everywhere, so every derivative the oracle takes exists; the losses go through
    :func:`torch.func.functional_call` of the module with the given parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 2), nn.Softplus())
    names = [name for name, _ in model.named_parameters()]
    params = [
        (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.7)
        .to(dtype=dtype, device=device)
        .requires_grad_()
        for p in model.parameters()
    ]
    model = model.to(dtype=dtype, device=device)

    def batch(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(n, 2, generator=gen, dtype=torch.float64).abs()
        return x.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device)

    x, y = batch(16)
    xv, yv = batch(12)

    def loss_on(xb: Tensor, yb: Tensor) -> Loss:
        def loss(ps: Sequence[Tensor]) -> Tensor:
            out = functional_call(model, dict(zip(names, ps, strict=True)), (xb,))
            return ((out - yb) ** 2).mean()

        return loss

    return Problem(
        params,
        loss_on(x, y),
        loss_on(xv, yv),
        module=model,
        batches={"train": (x, y), "val": (xv, yv)},
    )


@dataclass
class Quadratic:
    """``L_T(w) = ½ wᵀAw − bᵀw`` with a random SPD ``A`` over the concatenation of parameters
    of the given shapes, and a quadratic validation loss with its own ``A_V``, ``b_V``."""

    A: Tensor
    b: Tensor
    A_val: Tensor
    b_val: Tensor
    shapes: list[torch.Size] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return self.A.shape[0]

    def flatten(self, params: Sequence[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in params])

    def unflatten(self, w: Tensor) -> list[Tensor]:
        out, start = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(w[start : start + n].reshape(shape))
            start += n
        return out

    def train_loss(self, params: Sequence[Tensor]) -> Tensor:
        w = self.flatten(params)
        return 0.5 * w @ self.A @ w - self.b @ w

    def val_loss(self, params: Sequence[Tensor]) -> Tensor:
        w = self.flatten(params)
        return 0.5 * w @ self.A_val @ w - self.b_val @ w

    def minimizer(self, weight_decay: float = 0.0) -> Tensor:
        """The minimizer of ``L_T + ξ/2 |w|²``."""
        eye = torch.eye(self.dim, dtype=self.A.dtype)
        return torch.linalg.solve(self.A + weight_decay * eye, self.b)

    def problem(self, w: Tensor) -> Problem:
        params = [p.clone().requires_grad_() for p in self.unflatten(w)]
        return Problem(params, self.train_loss, self.val_loss)


def random_spd(n: int, gen: torch.Generator, low: float, high: float) -> Tensor:
    """A random symmetric matrix with eigenvalues spread over ``[low, high]``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(low, high, n, dtype=torch.float64)
    return (q * eig) @ q.T


def quadratic(
    seed: int, shapes: Sequence[tuple[int, ...]] = ((3,), (2, 2)), low: float = 0.5, high: float = 4
) -> Quadratic:
    """A strongly convex quadratic (Hessian eigenvalues in ``[low, high]``)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [torch.Size(s) for s in shapes]
    n = sum(s.numel() for s in sizes)
    return Quadratic(
        A=random_spd(n, gen, low, high),
        b=torch.randn(n, generator=gen, dtype=torch.float64),
        A_val=random_spd(n, gen, 0.5, 2.0),
        b_val=torch.randn(n, generator=gen, dtype=torch.float64),
        shapes=sizes,
    )


# --- the pre-step point of an optimizer ------------------------------------------------------


@dataclass
class GroupSpec:
    """One param group as the oracle sees it: its rule, every hyperparameter value the update
    reads (floats; learned ones are replaced by tensors when differentiating), its flags and
    how many parameters it holds."""

    rule: UpdateRule
    hp: dict[str, Any]
    flags: dict[str, object]
    size: int


@dataclass
class Start:
    """``z_t``: copies of the weights and of every group's optimizer state, and the groups."""

    params: list[Tensor]
    states: list[RuleState]
    specs: list[GroupSpec]

    def to(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> Start:
        """The same point cast (for an oracle in float64 of a float32 run)."""

        def cast(x: Tensor | None) -> Tensor | None:
            if x is None:
                return x
            return x.to(dtype=dtype, device=device)

        states = [
            {k: [x if k == "step" else cast(x) for x in xs] for k, xs in s.items()}
            for s in self.states
        ]
        specs = [
            GroupSpec(
                spec.rule,
                {k: [cast(x) for x in v] if isinstance(v, list) else v for k, v in spec.hp.items()},
                spec.flags,
                spec.size,
            )
            for spec in self.specs
        ]
        return Start([cast(p) for p in self.params], states, specs)  # type: ignore[misc]


def group_values(opt: HyperOptimizer, index: int = 0) -> dict[str, float]:
    """Every learnable hyperparameter of a group as the float in the param group (Adam's
    ``betas`` split into ``beta1`` and ``beta2``)."""
    group = opt.param_groups[index]
    out = {}
    for name in opt.rule.learnable:
        if name in ("beta1", "beta2"):
            out[name] = float(group["betas"][0 if name == "beta1" else 1])
        else:
            out[name] = float(group[name])
    return out


def capture(opt: HyperOptimizer) -> Start:
    """Deep copies of the parameters and the optimizer state of every group, with the
    hyperparameter values the next update reads: the group's floats, replaced by the learned
    tensors for ``"tensor"``/``"element"``.  Every parameter is assumed to receive a
    gradient; one not stepped yet gets ``rule.init_state``, as in the optimizer."""
    params, states, specs = [], [], []
    learned = opt.hyperparameters()
    for index, group in enumerate(opt.param_groups):
        flags = {k: group[k] for k in opt.flag_names}
        names = opt.rule.init_state([], flags)
        state: RuleState = {name: [] for name in names}
        for p in group["params"]:
            params.append(p.detach().clone())
            # a parameter never stepped gets the rule's fresh state, as the optimizer does
            own = opt.state[p] if opt.state.get(p) else opt.rule.init_state([p], flags)
            for name in names:
                x = own.get(name)
                if isinstance(x, list):
                    x = x[0]
                state[name].append(None if x is None else copy.deepcopy(x.detach()))
        hp: dict[str, Any] = dict(group_values(opt, index))
        for name, value in learned[index].items():
            if isinstance(value, list):
                hp[name] = [v.detach().clone() for v in value]
        states.append(state)
        specs.append(GroupSpec(opt.rule, hp, flags, len(group["params"])))
    return Start(params, states, specs)


def learned_tensors(
    opt: HyperOptimizer, dtype: torch.dtype | None = None, device: str | None = None
) -> list[Learned]:
    """The learned values of every group (``hyperparameters()``), as fresh tensors to
    differentiate with respect to (optionally cast, for a float64 oracle of a float32 run)."""

    def fresh(x: Tensor) -> Tensor:
        return x.detach().clone().to(dtype=dtype or x.dtype, device=device or x.device)

    return [
        {k: fresh(v) if isinstance(v, Tensor) else [fresh(x) for x in v] for k, v in g.items()}
        for g in opt.hyperparameters()
    ]


# --- the unrolled map ------------------------------------------------------------------------


def _split(xs: Sequence[Any], sizes: Sequence[int]) -> list[list[Any]]:
    out, start = [], 0
    for n in sizes:
        out.append(list(xs[start : start + n]))
        start += n
    return out


def _hyper(spec: GroupSpec, learned: Learned | None) -> dict[str, Any]:
    """The group's hyperparameters with the learned tensors in place of their values; a
    0-dim tensor (one value for the group) is repeated for every parameter."""
    hp = dict(spec.hp)
    for name, value in (learned or {}).items():
        hp[name] = [value] * spec.size if isinstance(value, Tensor) else list(value)
    return hp


def unroll(
    start: Start,
    grad_fn: Callable[[Sequence[Tensor]], list[Tensor]],
    steps: int = 1,
    learned: Sequence[Learned] | None = None,
) -> tuple[list[Tensor], list[RuleState]]:
    """``z_{t+steps}`` from ``z_t`` by the rules' reference maps; the learned tensors (one
    dict per group) are used in every step."""
    params, states = list(start.params), list(start.states)
    sizes = [spec.size for spec in start.specs]
    for _ in range(steps):
        grads = grad_fn(params)
        new_params: list[Tensor] = []
        new_states: list[RuleState] = []
        for i, (spec, ps, gs, state) in enumerate(
            zip(start.specs, _split(params, sizes), _split(grads, sizes), states, strict=True)
        ):
            hp = _hyper(spec, None if learned is None else learned[i])
            out_params, out_state = spec.rule.reference(ps, gs, state, hp, spec.flags)
            new_params.extend(out_params)
            new_states.append(out_state)
        params, states = new_params, new_states
    return params, states


def hypergradients(
    start: Start,
    problem: Problem,
    learned: Sequence[Learned],
    steps: int = 1,
) -> list[Learned]:
    """``d L_V(w_{t+steps}) / dλ`` for every learned tensor, by ``torch.func.grad`` through
    ``steps`` unrolled reference steps from ``start`` (the gradient of each step on the
    problem's training loss)."""

    def objective(values: list[Learned]) -> Tensor:
        params, _ = unroll(start, problem.train_grad, steps, values)
        return problem.val_loss(params)

    return grad(objective)(list(learned))


# --- dense linear algebra on the flat state (small problems only) ---------------------------


@dataclass
class FlatMap:
    """One step as a map of the flat state ``z = (w, s)`` (the differentiated state buffers
    in the rule's ``state_names`` order) and of the flat learned values."""

    start: Start
    problem: Problem
    state_names: tuple[str, ...]

    def flatten(self, params: Sequence[Tensor], states: Sequence[RuleState]) -> Tensor:
        parts = [p.reshape(-1) for p in params]
        for state in states:
            for name in self.state_names:
                parts.extend(x.reshape(-1) for x in state.get(name, []) if x is not None)
        return torch.cat(parts)

    def z0(self) -> Tensor:
        return self.flatten(self.start.params, self.start.states)

    def unflatten(self, z: Tensor) -> Start:
        shapes = [p.shape for p in self.start.params]
        pos = 0

        def take(shape: torch.Size) -> Tensor:
            nonlocal pos
            n = shape.numel()
            out = z[pos : pos + n].reshape(shape)
            pos += n
            return out

        params = [take(s) for s in shapes]
        states = []
        for state in self.start.states:
            new = {k: list(v) for k, v in state.items()}
            for name in self.state_names:
                if name in state:
                    new[name] = [None if x is None else take(x.shape) for x in state[name]]
            states.append(new)
        return Start(params, states, self.start.specs)

    def step(self, z: Tensor, learned: Sequence[Learned] | None = None) -> Tensor:
        params, states = unroll(self.unflatten(z), self.problem.train_grad, 1, learned)
        return self.flatten(params, states)

    def jacobian(self) -> Tensor:
        """``J = dU/dz`` at ``z_t`` (row ``i``: the derivative of output ``i``)."""
        return jacrev(self.step)(self.z0())

    def hyper_jacobian(self, learned: Sequence[Learned], group: int, name: str) -> Tensor:
        """``∂U/∂λ`` at ``z_t`` for one scalar learned value, as a column of length ``|z|``."""
        value = learned[group][name]
        assert isinstance(value, Tensor)
        assert value.dim() == 0

        def of(x: Tensor) -> Tensor:
            values = [dict(g) for g in learned]
            values[group][name] = x
            return self.step(self.z0(), values)

        return jacfwd(of)(value)

    def val_gradient(self, z: Tensor) -> Tensor:
        """``∂L_V/∂z``: the validation gradient in the weight block, zero in the state."""
        return grad(lambda x: self.problem.val_loss(self.unflatten(x).params))(z)


# --- Hessian-vector products and finite differences -------------------------------------------


def hvp(loss: Loss, point: Sequence[Tensor], directions: Sequence[Tensor]) -> list[Tensor]:
    """``H d`` exactly: forward-mode derivative of ``torch.func.grad`` (forward over reverse)."""
    _, out = jvp(lambda ps: grad(loss)(ps), (tuple(point),), (tuple(directions),))
    return list(out)


def central_difference(f: Callable[[float], float], x: float, h: float) -> float:
    """``(f(x + h) − f(x − h)) / 2h``."""
    return (f(x + h) - f(x - h)) / (2 * h)


# --- comparing -------------------------------------------------------------------------------


def flat(x: Tensor | Sequence[Tensor]) -> Tensor:
    """All entries of a tensor or a list of tensors as one float64 CPU vector."""
    xs = [x] if isinstance(x, Tensor) else list(x)
    return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in xs])


def max_error(got: Tensor | Sequence[Tensor], expected: Tensor | Sequence[Tensor]) -> float:
    return float((flat(got) - flat(expected)).abs().max())


def scale_of(x: Tensor | Sequence[Tensor]) -> float:
    return float(flat(x).abs().max())


def assert_close(
    got: Tensor | Sequence[Tensor],
    expected: Tensor | Sequence[Tensor],
    rtol: float,
    scale: float | None = None,
    what: str = "",
    atol: float = 0.0,
) -> None:
    """``max |got − expected| ≤ rtol · scale + atol``, with ``scale`` the largest
    ``|expected|`` unless given (so entries near zero are judged against the size of the
    whole quantity); ``atol`` only matters for a quantity that is exactly zero."""
    got_flat, expected_flat = flat(got), flat(expected)
    assert got_flat.shape == expected_flat.shape, (what, got_flat.shape, expected_flat.shape)
    s = scale_of(expected) if scale is None else scale
    err = max_error(got, expected)
    assert err <= rtol * s + atol, (
        f"{what}: max error {err:.3e} > {rtol:g} * scale {s:.3e} + {atol:g}\n"
        f"got      {got_flat[:8].tolist()}\nexpected {expected_flat[:8].tolist()}"
    )


__all__ = [
    "FlatMap",
    "GroupSpec",
    "Learned",
    "Problem",
    "Quadratic",
    "Start",
    "assert_close",
    "capture",
    "central_difference",
    "flat",
    "group_values",
    "hvp",
    "hypergradients",
    "learned_tensors",
    "max_error",
    "mlp_problem",
    "quadratic",
    "random_spd",
    "scale_of",
    "unroll",
]


def schedule_hypergradients(
    start: Start,
    problem: Problem,
    schedules: Sequence[Learned],
    steps: int,
    horizon: int | None = None,
) -> list[Learned]:
    """``d L_V(w_{t+steps}) / dλ_k`` for every window ``k`` of learned schedules, by
    ``torch.func.grad`` through ``steps`` unrolled reference steps from ``start``.

    ``schedules`` holds, per group, a tensor of shape ``(N,)`` per learned name (one value
    for the group per window) or a list of them (one per parameter); step ``t`` uses window
    ``⌊N t / horizon⌋`` (``horizon`` defaults to ``steps``).
    """
    horizon = steps if horizon is None else horizon

    def at(values: Sequence[Learned], k: int) -> list[Learned]:
        return [
            {n: v[k] if isinstance(v, Tensor) else [x[k] for x in v] for n, v in g.items()}
            for g in values
        ]

    def objective(values: list[Learned]) -> Tensor:
        params, states = list(start.params), list(start.states)
        for t in range(steps):
            windows = _windows(values)
            k = min(windows - 1, windows * t // horizon)
            params, states = unroll(
                Start(params, states, start.specs), problem.train_grad, 1, at(values, k)
            )
        return problem.val_loss(params)

    return grad(objective)(list(schedules))


def _windows(values: Sequence[Learned]) -> int:
    for g in values:
        for v in g.values():
            return int((v if isinstance(v, Tensor) else v[0]).shape[0])
    raise ValueError("no learned schedule")
