"""The update rules' closed-form products and fast steps against their reference maps.

DESIGN §3 and §7: ``state_vjp`` and ``hyper_vjp`` are closed forms of ``a·∂U/∂z``, ``a·∂U/∂g``
and ``a·∂U/∂λ``; each must equal ``torch.autograd.grad`` through ``rule.reference`` with the same
cotangent, for every learnable name (β2 and ε included) and every flag.  ``rule.step`` is the
fast in-place form of the same map and must never write to the gradients it is handed.

Float64 throughout.  Hypothesis draws the shapes (1–3 parameters, each of 1–3 dimensions of size
1–4), the seed of the tensors, the hyperparameter values across their valid ranges and the
granularity of the values: one float for the group, a 0-dim tensor per parameter, or a tensor
of the parameter's shape.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.optim.adam import adam as torch_adam
from torch.optim.sgd import sgd as torch_sgd

from hyperopt_optim.rules import AdamRule, Hyper, RuleState, SGDRule, UpdateRule
from hyperopt_optim.rules._base import linearise, state_vjp

PRODUCT_TOL = 1e-10
"""DESIGN §7: closed-form products vs autograd of the reference, relative to the block's scale."""

STEP_RTOL = 1e-12
"""DESIGN §7 "else 1e-12": the reference is plain maths (``mu * b + (1 - τ) * ĝ``) while the fast
kernels use torch's ops (``lerp_``, ``addcmul_``, ``add_(alpha=)``), which round differently.
That the fast step is torch's to the bit is tested against torch itself below."""

DTYPE = torch.float64

GRANULARITIES = ("float", "tensor", "element")
"""A float for the whole group, one 0-dim tensor per parameter, one value per element."""

RANGES: dict[str, tuple[float, float, bool]] = {
    # name: (low, high, log-uniform?) — the valid ranges the brief names
    "lr": (1e-4, 1.0, True),
    "momentum": (0.05, 0.99, False),
    "beta1": (0.05, 0.99, False),
    "beta2": (0.05, 0.99, False),
    "eps": (1e-8, 1e-1, True),
    "weight_decay": (1e-5, 0.5, True),
}

SGD_STATE = "momentum_buffer"
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


# --- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One point of an update rule: inputs, hyperparameter values, flags, learned names."""

    rule: UpdateRule
    params: list[Tensor]
    grads: list[Tensor]
    state: RuleState
    hp: dict[str, Hyper]
    flags: dict[str, object]
    names: tuple[str, ...]
    granularity: str

    def clone_inputs(self) -> tuple[list[Tensor], list[Tensor], RuleState]:
        return (
            [p.clone() for p in self.params],
            [g.clone() for g in self.grads],
            {k: [None if x is None else x.clone() for x in xs] for k, xs in self.state.items()},
        )


shapes_strategy = st.lists(
    st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3
)
seeds = st.integers(0, 2**32 - 1)


def _in_range(name: str) -> st.SearchStrategy[float]:
    low, high, _ = RANGES[name]
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def _spread(name: str, base: float, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Values of ``name`` around ``base``, inside the valid range, of the given shape."""
    low, high, log = RANGES[name]
    u = torch.rand(shape, generator=gen, dtype=DTYPE) - 0.5
    if log:
        lo, hi = math.log(low), math.log(high)
        return (math.log(base) + u * (hi - lo) / 4).clamp(lo, hi).exp()
    return (base + u * (high - low) / 4).clamp(low, high)


def _hyper(
    name: str, base: float, granularity: str, params: list[Tensor], gen: torch.Generator
) -> Hyper:
    if granularity == "float" or base == 0.0:  # a zero is torch's "off": only ever a float
        return base
    if granularity == "tensor":
        return [_spread(name, base, (), gen) for _ in params]
    return [_spread(name, base, tuple(p.shape), gen) for p in params]


@st.composite
def sgd_cases(draw: st.DrawFn, granularity: str) -> Case:
    shapes = draw(shapes_strategy)
    gen = torch.Generator().manual_seed(draw(seeds))
    nesterov = draw(st.booleans())
    maximize = draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.5]))
    momentum = draw(_in_range("momentum") if nesterov else st.just(0.0) | _in_range("momentum"))
    weight_decay = draw(st.just(0.0) | _in_range("weight_decay"))
    lr = draw(_in_range("lr"))
    params = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    # A buffer is None on a parameter's first step (torch creates it from the gradient).
    first = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    buffers: list[Tensor | None] = [
        None if f or momentum == 0.0 else torch.randn(s, generator=gen, dtype=DTYPE)
        for s, f in zip(shapes, first, strict=True)
    ]
    values = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    hp = {k: _hyper(k, v, granularity, params, gen) for k, v in values.items()}
    names = ("lr", "momentum", "weight_decay") if momentum else ("lr", "weight_decay")
    # every name, or a part of them (lr alone needs no cotangent through the buffer)
    names = draw(st.sampled_from([names, ("lr",), names[1:]]))
    flags = {"dampening": dampening, "nesterov": nesterov, "maximize": maximize}
    return Case(SGDRule(), params, grads, {SGD_STATE: buffers}, hp, flags, names, granularity)


@st.composite
def adam_cases(draw: st.DrawFn, granularity: str) -> Case:
    shapes = draw(shapes_strategy)
    gen = torch.Generator().manual_seed(draw(seeds))
    amsgrad = draw(st.booleans())
    flags = {
        "amsgrad": amsgrad,
        "maximize": draw(st.booleans()),
        "decoupled_weight_decay": draw(st.booleans()),
    }
    values = {
        "lr": draw(_in_range("lr")),
        "beta1": draw(_in_range("beta1")),
        "beta2": draw(_in_range("beta2")),
        "eps": draw(_in_range("eps")),
        "weight_decay": draw(st.just(0.0) | _in_range("weight_decay")),
    }
    steps = draw(st.lists(st.integers(0, 50), min_size=len(shapes), max_size=len(shapes)))
    params = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    state: RuleState = {
        "step": [torch.tensor(float(t)) for t in steps],
        "exp_avg": [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes],
        # log-normal: positive, so v' > 0 and √v' is differentiable everywhere
        "exp_avg_sq": [torch.randn(s, generator=gen, dtype=DTYPE).exp() for s in shapes],
    }
    if amsgrad:
        # drawn independently of v', so max(v̄, v') has a tie with probability zero
        state["max_exp_avg_sq"] = [torch.randn(s, generator=gen, dtype=DTYPE).exp() for s in shapes]
    hp = {k: _hyper(k, v, granularity, params, gen) for k, v in values.items()}
    # every name, or only names that act on w' alone (Adam's shorter path)
    names = draw(
        st.sampled_from([AdamRule.learnable, ("lr",), ("lr", "eps"), ("lr", "weight_decay")])
    )
    return Case(AdamRule(), params, grads, state, hp, flags, names, granularity)


CASES = {"sgd": sgd_cases, "adam": adam_cases}


# --- the oracle ------------------------------------------------------------------------------


@dataclass
class Oracle:
    """Autograd of ``a·U`` through the reference map, for every input."""

    params: list[Tensor]
    grads: list[Tensor]
    state: dict[str, list[Tensor | None]]  # None: the input buffer did not exist
    hyper: dict[str, list[Tensor]]  # float: one shared entry; else one per parameter


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_()


def autograd_oracle(case: Case, cot_params: list[Tensor], cot_state: RuleState) -> Oracle:
    params = [_leaf(p) for p in case.params]
    grads = [_leaf(g) for g in case.grads]
    state: RuleState = {
        k: [
            None if x is None else _leaf(x) if k in case.rule.state_names else x.clone() for x in xs
        ]
        for k, xs in case.state.items()
    }
    hyper: dict[str, list[Tensor]] = {}
    hp: dict[str, Hyper] = dict(case.hp)  # unlearned values as they are (a float 0 is "off")
    for name in case.names:
        value = case.hp[name]
        if isinstance(value, float):
            shared = torch.tensor(value, dtype=DTYPE, requires_grad=True)
            hyper[name] = [shared]
            hp[name] = [shared] * len(params)
        else:
            hyper[name] = [_leaf(v) for v in value]
            hp[name] = hyper[name]
    new_params, new_state = case.rule.reference(params, grads, state, hp, case.flags)
    total = sum((a * w).sum() for a, w in zip(cot_params, new_params, strict=True))
    for k, cots in cot_state.items():
        for a, s in zip(cots, new_state[k], strict=True):
            assert a is not None
            assert s is not None
            total = total + (a * s).sum()
    state_leaves = [x for k in case.rule.state_names for x in state.get(k, []) if x is not None]
    hyper_leaves = [x for name in case.names for x in hyper[name]]
    inputs = params + grads + state_leaves + hyper_leaves
    assert isinstance(total, Tensor)
    found = iter(
        torch.zeros_like(x) if d is None else d
        for x, d in zip(inputs, torch.autograd.grad(total, inputs, allow_unused=True), strict=True)
    )
    out = Oracle([next(found) for _ in params], [next(found) for _ in grads], {}, {})
    for k in case.rule.state_names:
        if k in state:
            out.state[k] = [None if x is None else next(found) for x in state[k]]
    for name in case.names:
        out.hyper[name] = [next(found) for _ in hyper[name]]
    return out


def random_cotangents(case: Case, seed: int) -> tuple[list[Tensor], RuleState]:
    """Random ``a_w`` and ``a_s`` for every state buffer the step produces."""
    gen = torch.Generator().manual_seed(seed)
    cot_params = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in case.params]
    _, new_state = case.rule.reference(*case.clone_inputs(), case.hp, case.flags)
    cot_state: RuleState = {
        k: [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in case.params]
        for k in case.rule.state_names
        if k in new_state
    }
    return cot_params, cot_state


def assert_close_scaled(actual: Tensor, expected: Tensor, scale: float, what: str) -> None:
    """``|actual − expected|∞ ≤ PRODUCT_TOL · scale``, exact where the scale is zero."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert err <= PRODUCT_TOL * scale, (
        f"{what}: |closed form - autograd| = {err:.3e} > {PRODUCT_TOL:g} x {scale:.3e}"
    )


def _inf_norm(x: Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def assert_blocks_close(actual: list[Tensor], expected: list[Tensor], what: str) -> None:
    """Each tensor of a block within PRODUCT_TOL of the block's largest entry."""
    scale = max(_inf_norm(e) for e in expected + actual)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close_scaled(a, e, scale, f"{what}[{i}]")


# --- 1. closed-form products against autograd of the reference -----------------------------


@pytest.mark.parametrize("linearised", [False, True], ids=["recomputed", "linearised"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rule", list(CASES))
@given(data=st.data(), cot_seed=seeds)
def test_state_vjp_matches_autograd_of_reference(
    rule: str, granularity: str, linearised: bool, data: st.DataObject, cot_seed: int
) -> None:
    """``linearised``: from the rule's ``linearise`` of the point, which Adam keeps for every
    product taken there (the Neumann series' terms, forward mode's Jacobian blocks)."""
    case = data.draw(CASES[rule](granularity))
    cot_params, cot_state = random_cotangents(case, cot_seed)
    oracle = autograd_oracle(case, cot_params, cot_state)
    params, grads, state = case.clone_inputs()
    linear = linearise(case.rule, params, grads, state, case.hp, case.flags) if linearised else None
    if linearised and linear is None:
        pytest.skip(f"{rule} recomputes its step in every product")
    got = state_vjp(
        case.rule, params, grads, state, case.hp, case.flags, cot_params, cot_state, linear
    )

    assert_blocks_close(got.params, oracle.params, "a·∂U/∂w")
    assert_blocks_close(got.grads, oracle.grads, "r = a·∂U/∂g")
    assert set(got.state) == set(cot_state), "one state cotangent per buffer the step produces"
    for k, expected in oracle.state.items():
        if k not in cot_state:
            continue
        # a buffer that did not exist yet (SGD's first step) has a zero cotangent
        want = [
            torch.zeros_like(p) if e is None else e
            for p, e in zip(case.params, expected, strict=True)
        ]
        have = [
            torch.zeros_like(p) if a is None else a
            for p, a in zip(case.params, got.state[k], strict=True)
        ]
        assert_blocks_close(have, want, f"a·∂U/∂{k}")


@given(
    data=st.data(),
    kinds=st.tuples(*[st.sampled_from(["float", "tensor", "element"])] * 3),
    zeros=st.booleans(),
)
def test_adam_fused_linearisation_matches_the_point(
    data: st.DataObject, kinds: tuple[str, str, str], zeros: bool
) -> None:
    """Adam's fused linearisation (float β₁, β₂, no AMSGrad) against the one :meth:`_point`
    makes from the step's formulas, with lr, eps and the weight decay each a float, one value
    per tensor or per element; ``zeros``: v = 0 and ĝ = 0 on some elements, where ∂q/∂v' is
    taken as 0 (the oracle test draws v > 0)."""
    case = data.draw(adam_cases("float"))
    case.flags["amsgrad"] = False
    case.state.pop("max_exp_avg_sq", None)
    gen = torch.Generator().manual_seed(data.draw(seeds))
    params, grads, state = case.clone_inputs()
    if zeros:
        for w, g, v in zip(params, grads, state["exp_avg_sq"], strict=True):
            where = torch.rand(v.shape, generator=gen) < 0.5
            v[where] = 0.0
            g[where] = 0.0
            w[where] = 0.0  # ĝ = g + ξw = 0 there with coupled decay too
    hp = dict(case.hp)
    for name, kind in zip(("lr", "eps", "weight_decay"), kinds, strict=True):
        hp[name] = _hyper(name, float(case.hp[name]), kind, params, gen)  # type: ignore[arg-type]
    rule = AdamRule()
    inputs = [params, grads, state["exp_avg"], state["exp_avg_sq"]]
    kept = [[x.clone() for x in xs] for xs in inputs]
    fused = rule.linearise(params, grads, state, hp, case.flags)
    rule.hyper_vjp_sums(params, grads, state, hp, case.flags, grads, {}, ("lr",), linear=fused)
    for xs, ys in zip(inputs, kept, strict=True):  # nothing written into the step's inputs
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y)
    for i, f in enumerate(fused):
        want = rule._point(params, grads, state, hp, case.flags, i).linear
        for field in ("step_coef", "second_coef", "g_hat_2"):
            a, e = getattr(f, field), getattr(want, field)
            assert a.shape == e.shape, field
            torch.testing.assert_close(a, e, rtol=1e-12, atol=0.0, msg=field)
        if zeros:
            assert bool((f.second_coef[state["exp_avg_sq"][i] == 0] == 0).all())


@pytest.mark.parametrize("state_cotangent", [True, False], ids=["with-state", "weights-only"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rule", list(CASES))
@given(data=st.data(), cot_seed=seeds)
def test_hyper_vjp_matches_autograd_of_reference(
    rule: str, granularity: str, state_cotangent: bool, data: st.DataObject, cot_seed: int
) -> None:
    """``weights-only``: no cotangent on the state (greedy's case).  Adam's lr, eps and AdamW's
    weight decay take a shorter path either way (they act on w' alone)."""
    case = data.draw(CASES[rule](granularity))
    cot_params, cot_state = random_cotangents(case, cot_seed)
    if not state_cotangent:
        cot_state = {}
    oracle = autograd_oracle(case, cot_params, cot_state)
    params, grads, state = case.clone_inputs()
    got = case.rule.hyper_vjp(
        params, grads, state, case.hp, case.flags, cot_params, cot_state, case.names
    )

    assert set(got) == set(case.names)
    for name in case.names:
        elementwise = got[name]
        assert [e.shape for e in elementwise] == [p.shape for p in case.params], name
        # summed over every element of every parameter: dL/dλ of one shared value
        total = torch.stack([e.sum() for e in elementwise]).sum()
        scale = sum(float(e.abs().sum()) for e in elementwise)
        expected_total = torch.stack([x.sum() for x in oracle.hyper[name]]).sum()
        assert_close_scaled(total, expected_total, scale, f"a·∂U/∂{name} summed")
        if isinstance(case.hp[name], float):
            continue  # an unlearned zero stays torch's float "off" at every granularity
        if granularity == "tensor":
            per_tensor = [e.sum() for e in elementwise]
            for i, (a, e) in enumerate(zip(per_tensor, oracle.hyper[name], strict=True)):
                scale = float(elementwise[i].abs().sum())
                assert_close_scaled(a, e, scale, f"a·∂U/∂{name}[{i}] per tensor")
        if granularity == "element":
            assert_blocks_close(elementwise, oracle.hyper[name], f"a·∂U/∂{name} per element")


# --- 2. the fast in-place step against the reference ----------------------------------------


def _assert_step_matches(
    case: Case, got: list[Tensor | None], want: list[Tensor | None], what: str
):
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert a is not None, f"{what}[{i}] missing from the fast step"
        assert e is not None, f"{what}[{i}] missing from the reference"
        err = float((a - e).abs().max())
        assert err <= STEP_RTOL * _inf_norm(e), f"{what}[{i}]: {err:.3e} ({case.granularity})"


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rule", list(CASES))
@given(data=st.data())
def test_fast_step_matches_reference(rule: str, granularity: str, data: st.DataObject) -> None:
    case = data.draw(CASES[rule](granularity))
    want_params, want_state = case.rule.reference(*case.clone_inputs(), case.hp, case.flags)
    params, grads, state = case.clone_inputs()
    case.rule.step(params, grads, state, case.hp, case.flags)

    for g, g0 in zip(grads, case.grads, strict=True):
        assert torch.equal(g, g0), "the fast step wrote to the gradients it was handed"
    _assert_step_matches(case, list(params), list(want_params), "w'")
    for k, want in want_state.items():
        if k == "step":
            assert [float(t) for t in state[k]] == [float(t) for t in want], "step counts"
        else:
            _assert_step_matches(case, state[k], want, k)


FLAG_CASES = [
    pytest.param({"nesterov": True, "maximize": False}, 0.0, id="nesterov-no-wd"),
    pytest.param({"nesterov": True, "maximize": True}, 0.0, id="nesterov-maximize-no-wd"),
    pytest.param({"nesterov": True, "maximize": False}, 1e-2, id="nesterov-wd"),
    pytest.param({"nesterov": False, "maximize": False}, 0.0, id="heavy-ball-no-wd"),
]


@pytest.mark.parametrize("first_step", [True, False], ids=["first-step", "later-step"])
@pytest.mark.parametrize(("flags", "weight_decay"), FLAG_CASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sgd_step_never_writes_grads(
    granularity: str, flags: dict[str, bool], weight_decay: float, first_step: bool
) -> None:
    """torch's own foreach SGD adds the momentum into the gradient in place for Nesterov
    without weight decay; the rule must leave the caller's gradients alone."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (4,)]
    params = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes]
    before = [g.clone() for g in grads]
    buffers: list[Tensor | None] = [
        None if first_step else torch.randn(s, generator=gen, dtype=DTYPE) for s in shapes
    ]
    values = {"lr": 0.1, "momentum": 0.9, "weight_decay": weight_decay}
    hp = {k: _hyper(k, v, granularity, params, gen) for k, v in values.items()}
    for _ in range(2):  # the first step creates the buffers, the second uses them
        SGDRule().step(params, grads, {SGD_STATE: buffers}, hp, {"dampening": 0.0, **flags})
        for g, g0 in zip(grads, before, strict=True):
            assert torch.equal(g, g0)


# --- the fast step is torch's arithmetic ----------------------------------------------------


def _torch_functional_step(case: Case, foreach: bool) -> tuple[list[Tensor], RuleState]:
    """torch.optim's functional SGD / Adam on clones of the case's inputs."""
    params, grads, state = case.clone_inputs()
    hp, flags = case.hp, case.flags
    if isinstance(case.rule, SGDRule):
        buffers = state[SGD_STATE]
        torch_sgd(
            params, grads, buffers, foreach=foreach,
            weight_decay=hp["weight_decay"], momentum=hp["momentum"], lr=hp["lr"],
            dampening=flags["dampening"], nesterov=flags["nesterov"], maximize=flags["maximize"],
        )  # fmt: skip
        return params, ({SGD_STATE: buffers} if hp["momentum"] else {})
    step: Callable[..., Any] = torch_adam
    decoupled: dict[str, Any] = {"decoupled_weight_decay": flags["decoupled_weight_decay"]}
    if "decoupled_weight_decay" not in inspect.signature(torch_adam).parameters:
        # torch 2.5 and earlier: AdamW has its own functional step, Adam no such flag
        from torch.optim.adamw import adamw as torch_adamw

        step = torch_adamw if flags["decoupled_weight_decay"] else torch_adam
        decoupled = {}
    step(
        params, grads, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", []),
        state["step"], foreach=foreach, **decoupled, amsgrad=flags["amsgrad"],
        beta1=hp["beta1"], beta2=hp["beta2"], lr=hp["lr"], weight_decay=hp["weight_decay"],
        eps=hp["eps"], maximize=flags["maximize"],
    )  # fmt: skip
    return params, state


@pytest.mark.parametrize("foreach", [False, True], ids=["for-loop", "foreach"])
@pytest.mark.parametrize("rule", list(CASES))
@given(data=st.data())
def test_fast_step_is_torch_bitwise(rule: str, foreach: bool, data: st.DataObject) -> None:
    """With float hyperparameters ``rule.step`` is torch.optim's functional step to 0 ulp."""
    case = data.draw(CASES[rule]("float"))
    want_params, want_state = _torch_functional_step(case, foreach)
    params, grads, state = case.clone_inputs()
    case.rule.step(params, grads, state, case.hp, case.flags)
    for i, (a, e) in enumerate(zip(params, want_params, strict=True)):
        assert torch.equal(a, e), f"w'[{i}] differs from torch by {float((a - e).abs().max()):.3e}"
    for k, want in want_state.items():
        for i, (a, e) in enumerate(zip(state[k], want, strict=True)):
            assert a is not None
            assert e is not None
            assert torch.equal(a.to(e.dtype), e), f"{k}[{i}] differs from torch"
