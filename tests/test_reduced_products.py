"""The hyper-step's lean arithmetic: ``∂U/∂λ`` products summed piece by piece as they are
made (``GroupSnapshot.reduced_hyper_vjp``) give the hypergradients of the whole-tensor
products, for every rule, granularity and layout (a parameter that is not contiguous stays
whole), and the series' sum kept in its own terms' tensors leaves the caller's gradients
alone where autograd returns them expanded."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hyperopt_optim import HyperAdam, HyperAdamW, HyperSGD
from hyperopt_optim.hypergradients import _base, onepass
from hyperopt_optim.rules import AdamRule, SGDRule

SGD_ALL = ("lr", "momentum", "weight_decay")
ADAM_ALL = ("lr", "beta1", "beta2", "eps", "weight_decay")
CASES = [
    (HyperSGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, SGD_ALL),
    (HyperSGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True}, ("lr", "momentum")),
    (HyperAdam, {"lr": 0.01, "weight_decay": 0.01, "amsgrad": True}, ADAM_ALL),
    (HyperAdamW, {"lr": 0.01, "weight_decay": 0.01}, ("lr", "eps", "weight_decay")),
]


class _Model(nn.Module):
    """Two layers, the first weight a transposed (non-contiguous) tensor."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(7, 5, generator=gen, dtype=torch.float64).t())
        self.b1 = nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(2, 7, generator=gen, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2.t()


def _run(cls: type, kwargs: dict[str, Any], learn: tuple[str, ...], granularity: str,
         method: str) -> list[dict[str, Any]]:  # fmt: skip
    model = _Model()
    assert not model.w1.is_contiguous()
    gen = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(16, 5, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
    )
    xv, yv = (
        torch.randn(8, 5, generator=gen, dtype=torch.float64),
        torch.randn(8, 2, generator=gen, dtype=torch.float64),
    )
    opt = cls(model.parameters(), **kwargs, learn=learn, granularity=granularity, method=method,
              update_interval=2, hvp="autograd")  # fmt: skip
    for _ in range(6):
        opt.step(
            lambda: ((model(x) - y) ** 2).mean(), val_closure=lambda: ((model(xv) - yv) ** 2).mean()
        )
    return [
        opt.hypergradients(),
        opt.hyperparameters(),
        [p.detach().clone() for p in model.parameters()],
    ]


def _assert_sums(
    got: dict[str, list[Tensor]] | None, want: dict[str, list[Tensor]], names: tuple[str, ...]
) -> None:
    """Each sum a 0-dim float64 tensor within 1e-13 of Σ|products| of the element-wise
    products' sum (float64 inputs)."""
    assert got is not None
    assert set(got) == set(names)
    for name in names:
        for g, w in zip(got[name], want[name], strict=True):
            assert g.dtype == torch.float64
            assert g.dim() == 0
            scale = float(w.abs().sum()) + 1e-300
            assert abs(float(g) - float(w.sum())) <= 1e-13 * scale, name


@pytest.mark.parametrize(
    ("cls", "kwargs", "learn"), CASES, ids=["sgd", "nesterov", "adam", "adamw"]
)
@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
@pytest.mark.parametrize(("method", "lean"), [("greedy", False), ("ift", False), ("ift", True)])
def test_pieces_give_the_whole_products(
    monkeypatch: pytest.MonkeyPatch, cls: type, kwargs: dict[str, Any], learn: tuple[str, ...],
    granularity: str, method: str, lean: bool,
) -> None:  # fmt: skip
    """Pieces of 3 elements (slices of tensors) give the whole tensors' hypergradients; and
    ``lean``: the series reduced term by term (SGD's terms written in place) gives the sum's."""
    whole = _run(cls, kwargs, learn, granularity, method)  # the groups are below one piece
    monkeypatch.setattr(_base, "REDUCE_CHUNK", 3)
    if lean:
        monkeypatch.setattr(onepass, "LEAN_ELEMENTS", 0)
    pieces = _run(cls, kwargs, learn, granularity, method)
    for got_group, want_group in zip(pieces[0], whole[0], strict=True):
        for name, want in want_group.items():
            got = got_group[name]
            if isinstance(want, Tensor):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
            else:
                for g, w in zip(got, want, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    for got, want in zip(pieces[2], whole[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_pieces_cover_every_element_once() -> None:
    numels = [10, 1, 0, 7, 4]
    calls = _base._pieces(numels, [True, True, True, False, True], 3)
    covered = [[0] * n for n in numels]
    for call in calls:
        assert sum(b - a for _, a, b in call) <= 3 or len(call) == 1
        for i, a, b in call:
            for k in range(a, b):
                covered[i][k] += 1
    assert all(c == [1] * n for c, n in zip(covered, numels, strict=True))
    assert (3, 0, 7) in [piece for call in calls for piece in call]  # not sliceable: whole


def test_series_sum_does_not_write_into_an_expanded_gradient() -> None:
    """The validation gradient of a sum is an expanded tensor (one element in memory): the
    series accumulates in a copy of it."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    opt = HyperSGD([w], lr=0.1, momentum=0.5, learn=("lr", "momentum"), method="ift",
                   update_interval=1, neumann_steps=2, hvp="autograd")  # fmt: skip
    val = torch.autograd.grad(w.sum(), w)[0]
    assert val.stride() == (0,)  # what autograd gives for a sum
    for _ in range(3):
        opt.step(lambda: ((w * x) ** 2).sum(), val_closure=lambda: w.sum())
    assert all(torch.isfinite(v).all() for v in opt.hypergradients()[0].values())


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dampening", [0.0, 0.3])
@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
@pytest.mark.parametrize("state_block", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_sgd_in_place_state_vjp_equals_state_vjp(
    nesterov: bool, maximize: bool, dampening: float, weight_decay: float, state_block: bool,
    per_tensor: bool,
) -> None:  # fmt: skip
    if nesterov and dampening:
        pytest.skip("torch refuses Nesterov with dampening")
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,)]

    def draw() -> list[Tensor]:
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    params, grads, bufs, a_w, a_b = draw(), draw(), draw(), draw(), draw()
    hp: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": weight_decay}
    if per_tensor:
        hp["lr"] = [torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
        hp["momentum"] = [torch.full(s, 0.8, dtype=torch.float64) for s in shapes]
    flags = {"dampening": dampening, "nesterov": nesterov, "maximize": maximize}
    cot_state = {"momentum_buffer": a_b} if state_block else {}
    rule = SGDRule()
    state = {"momentum_buffer": bufs}
    want = rule.state_vjp(params, grads, state, hp, flags, a_w, cot_state)
    given = [x.clone() for x in a_w], {k: [x.clone() for x in v] for k, v in cot_state.items()}
    got = rule.state_vjp_(params, grads, state, hp, flags, *given)
    pairs = [
        *zip(got.params, want.params, strict=True),
        *zip(got.grads, want.grads, strict=True),
        *zip(got.state["momentum_buffer"], want.state["momentum_buffer"], strict=True),
    ]
    for g, w in pairs:
        torch.testing.assert_close(g, w, rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("state_block", [False, True])
@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize(
    ("linearised", "in_place", "weight_decay"),
    [(False, True, 0.1), (True, True, 0.1), (True, False, 0.1), (True, True, 0.0)],
)
def test_adam_in_place_state_vjp_equals_state_vjp(
    amsgrad: bool, decoupled: bool, maximize: bool, state_block: bool, per_tensor: bool,
    linearised: bool, in_place: bool, weight_decay: float,
) -> None:  # fmt: skip
    """The in-place product, and the products from a kept linearisation (without AMSGrad:
    fused operations, whole tensors), equal the product that recomputes the step."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,)]

    def draw() -> list[Tensor]:
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    rule = AdamRule()
    flags = {"amsgrad": amsgrad, "maximize": maximize, "decoupled_weight_decay": decoupled}
    params, grads, a_w = draw(), draw(), draw()
    state = rule.init_state(params, flags)
    state["exp_avg"] = draw()
    state["exp_avg_sq"] = [x.abs() for x in draw()]
    if amsgrad:
        state["max_exp_avg_sq"] = [x.abs() for x in draw()]
    state["step"] = [torch.tensor(3.0), torch.tensor(3.0)]
    hp: dict[str, Any] = {
        "lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3, "weight_decay": weight_decay
    }  # fmt: skip
    if per_tensor:
        hp["lr"] = [
            torch.tensor(0.01, dtype=torch.float64),
            torch.tensor(0.02, dtype=torch.float64),
        ]
        hp["beta1"] = [torch.full(s, 0.8, dtype=torch.float64) for s in shapes]
    cot_state: dict[str, Any] = {}
    if state_block:
        cot_state = {"exp_avg": draw(), "exp_avg_sq": draw()}
        if amsgrad:
            cot_state["max_exp_avg_sq"] = draw()
    want = rule.state_vjp(params, grads, state, hp, flags, a_w, cot_state)
    given = [x.clone() for x in a_w], {k: [x.clone() for x in v] for k, v in cot_state.items()}
    linear = rule.linearise(params, grads, state, hp, flags) if linearised else None
    take = rule.state_vjp_ if in_place else rule.state_vjp
    got = take(params, grads, state, hp, flags, *given, linear=linear)
    if not in_place:  # the cotangent is left as it was
        for x, y in zip(given[0], a_w, strict=True):
            assert torch.equal(x, y)
    pairs = [*zip(got.params, want.params, strict=True), *zip(got.grads, want.grads, strict=True)]
    assert set(got.state) == set(want.state)
    for name in want.state:
        for g, w in zip(got.state[name], want.state[name], strict=True):
            if w is None:
                assert g is None
            else:
                pairs.append((g, w))
    for g, w in pairs:
        torch.testing.assert_close(g, w, rtol=1e-15, atol=0.0)


AFTER_CASES = [
    (HyperSGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}, ("lr",)),
    (HyperSGD, {"lr": 0.05, "momentum": 0.7, "dampening": 0.2, "maximize": True}, ("lr",)),
    (HyperAdam, {"lr": 0.01, "weight_decay": 0.01}, ("lr",)),
    (HyperAdam, {"lr": 0.01, "amsgrad": True}, ("lr", "eps")),
    (HyperAdamW, {"lr": 0.01, "weight_decay": 0.0}, ("lr", "eps")),
    (HyperAdamW, {"lr": 0.01, "weight_decay": 0.01}, ("eps",)),
]


@pytest.mark.parametrize(("cls", "kwargs", "learn"), AFTER_CASES)
@pytest.mark.parametrize("granularity", ["scalar", "tensor", "element"])
def test_greedy_from_the_state_after_the_step_is_bitwise_the_same(
    monkeypatch: pytest.MonkeyPatch,
    cls: type,
    kwargs: dict[str, Any],
    learn: tuple[str, ...],
    granularity: str,
) -> None:
    """Greedy's ``∂U/∂λ`` product read from the buffers the update leaves (no copy of the
    point: ``GroupSnapshot.after``) equals the one at a copied point.  Not always bit for bit:
    at the point, Adam recomputes ``ĝ = g + ξw`` with two roundings where the step's foreach
    kernel takes one (the state after the step is the step's own arithmetic)."""
    seen: list[bool] = []
    after_update = onepass.OnePass.after_update

    def spy(self: onepass.OnePass, ctx: Any) -> Any:
        if ctx.groups is not None:
            seen.extend(g.after for g in ctx.groups)
        return after_update(self, ctx)

    monkeypatch.setattr(onepass.OnePass, "after_update", spy)
    lean = _run(cls, kwargs, learn, granularity, "greedy")
    assert seen
    assert all(seen)
    seen.clear()
    monkeypatch.setattr(cls.rule, "can_vjp_after", lambda *args: False, raising=False)
    copied = _run(cls, kwargs, learn, granularity, "greedy")
    assert seen
    assert not any(seen)
    for got_group, want_group in zip(lean[0], copied[0], strict=True):
        for name, want in want_group.items():
            got = got_group[name]
            pairs = [(got, want)] if isinstance(want, Tensor) else zip(got, want, strict=True)
            for g, w in pairs:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-16, msg=name)
    for got, want in zip(lean[2], copied[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-16)


@settings(max_examples=60, deadline=None)
@given(
    learn=st.lists(st.sampled_from(SGD_ALL), min_size=1, max_size=3, unique=True),
    momentum=st.sampled_from([0.0, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    weight_decay=st.sampled_from([0.0, 0.02]),
    maximize=st.booleans(),
    state_block=st.booleans(),
    per_tensor=st.booleans(),
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_sgd_sums_by_inner_products_equal_the_summed_products(
    learn: list[str], momentum: float, dampening: float, weight_decay: float, maximize: bool,
    state_block: bool, per_tensor: bool, shapes: list[tuple[int, ...]], seed: int,
) -> None:  # fmt: skip
    """``SGDRule.hyper_vjp_sums`` (inner products, no temporaries) equals the element-wise
    ``hyper_vjp`` summed per parameter, in float64, for every flag and learned subset."""
    if momentum == 0.0 and "momentum" in learn:
        learn = [n for n in learn if n != "momentum"] or ["lr"]
    gen = torch.Generator().manual_seed(seed)

    def draw() -> list[Tensor]:
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    params, grads, bufs, a_w, a_b = draw(), draw(), draw(), draw(), draw()
    hp: dict[str, Any] = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay}
    if per_tensor:  # one value per tensor, as tensor granularity gives them
        for name in learn:
            hp[name] = [
                torch.rand((), generator=gen, dtype=torch.float64) * 0.5 + 0.01 for _ in shapes
            ]
    flags = {"dampening": dampening, "nesterov": False, "maximize": maximize}
    uses_buffer = not (isinstance(hp["momentum"], float) and hp["momentum"] == 0.0)
    state = {"momentum_buffer": bufs if uses_buffer else [None] * len(shapes)}
    cot_state = {"momentum_buffer": a_b} if state_block and uses_buffer else {}
    names = tuple(learn)
    rule = SGDRule()
    got = rule.hyper_vjp_sums(params, grads, state, hp, flags, a_w, cot_state, names)
    want = rule.hyper_vjp(params, grads, state, hp, flags, a_w, cot_state, names)
    _assert_sums(got, want, names)


def test_sgd_sums_by_inner_products_decline_what_they_do_not_cover() -> None:
    """Nesterov, a value per element and a missing buffer go to the element-wise products."""
    shapes = [(3, 2), (4,)]
    xs = [torch.ones(s, dtype=torch.float64) for s in shapes]
    hp: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    flags = {"dampening": 0.0, "nesterov": False, "maximize": False}
    state = {"momentum_buffer": list(xs)}
    rule = SGDRule()
    args = (xs, xs, state, hp, flags, xs, {}, ("lr",))
    assert rule.hyper_vjp_sums(*args) is not None
    nesterov = {**flags, "nesterov": True}
    assert rule.hyper_vjp_sums(xs, xs, state, hp, nesterov, xs, {}, ("lr",)) is None
    element = {**hp, "lr": [torch.full(s, 0.1, dtype=torch.float64) for s in shapes]}
    assert rule.hyper_vjp_sums(xs, xs, state, element, flags, xs, {}, ("lr",)) is None
    missing = {"momentum_buffer": [xs[0], None]}
    assert rule.hyper_vjp_sums(xs, xs, missing, hp, flags, xs, {}, ("lr",)) is None


@given(
    learn=st.sampled_from(
        [
            ("lr",),
            ("eps",),
            ("lr", "eps"),
            ("eps", "lr"),
            ("weight_decay",),
            ("lr", "eps", "weight_decay"),
        ]
    ),
    decoupled=st.booleans(),
    amsgrad=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.02]),
    per_tensor=st.booleans(),
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3
    ),
    seed=st.integers(0, 2**16),
)
def test_adam_sums_from_the_linearisation_equal_the_summed_products(
    learn: tuple[str, ...], decoupled: bool, amsgrad: bool, maximize: bool, weight_decay: float,
    per_tensor: bool, shapes: list[tuple[int, ...]], seed: int,
) -> None:  # fmt: skip
    """``AdamRule.hyper_vjp_sums`` (lr, eps and AdamW's weight decay from a kept
    linearisation and inner products) equals the element-wise ``hyper_vjp`` summed per
    parameter, in float64, with and without AMSGrad (whose linearisation is ``_point``'s),
    whatever the order of the names (eps scales lr's temporary in place)."""
    if "weight_decay" in learn and not decoupled:
        decoupled = True  # Adam's coupled decay reads the state: not a direct name
    gen = torch.Generator().manual_seed(seed)

    def draw() -> list[Tensor]:
        return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    params, grads, ms, a_w = draw(), draw(), draw(), draw()
    vs = [x.exp() for x in draw()]
    state: dict[str, Any] = {
        "step": [torch.tensor(float(k % 7)) for k in range(len(shapes))],
        "exp_avg": ms,
        "exp_avg_sq": vs,
    }
    if amsgrad:
        state["max_exp_avg_sq"] = [x.exp() for x in draw()]
    hp: dict[str, Any] = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3,
                          "weight_decay": weight_decay}  # fmt: skip
    if per_tensor:  # one value per tensor, as tensor granularity gives them
        for name in learn:
            hp[name] = [
                torch.rand((), generator=gen, dtype=torch.float64) * 0.05 + 0.001 for _ in shapes
            ]
    flags = {"amsgrad": amsgrad, "maximize": maximize, "decoupled_weight_decay": decoupled}
    rule = AdamRule()
    linear = rule.linearise(params, grads, state, hp, flags)
    got = rule.hyper_vjp_sums(params, grads, state, hp, flags, a_w, {}, learn, linear=linear)
    want = rule.hyper_vjp(params, grads, state, hp, flags, a_w, {}, learn)
    _assert_sums(got, want, learn)


def test_adam_sums_decline_what_they_do_not_cover() -> None:
    """Without a linearisation, for a name that reads the state, a value per element or a
    fixed lr of 0, Adam's sums go to the element-wise products."""
    shapes = [(3, 2), (4,)]
    xs = [torch.ones(s, dtype=torch.float64) for s in shapes]
    state: dict[str, Any] = {"step": [torch.tensor(1.0)] * 2, "exp_avg": xs, "exp_avg_sq": xs}
    hp: dict[str, Any] = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8,
                          "weight_decay": 0.0}  # fmt: skip
    flags = {"amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
    rule = AdamRule()
    linear = rule.linearise(xs, xs, state, hp, flags)
    assert rule.hyper_vjp_sums(xs, xs, state, hp, flags, xs, {}, ("lr",), linear=linear)
    assert rule.hyper_vjp_sums(xs, xs, state, hp, flags, xs, {}, ("lr",)) is None
    for name in ("beta1", "beta2", "weight_decay"):  # coupled decay reads the state
        assert rule.hyper_vjp_sums(xs, xs, state, hp, flags, xs, {}, (name,), linear=linear) is None
    element = {**hp, "lr": [torch.full(s, 0.1, dtype=torch.float64) for s in shapes]}
    assert (
        rule.hyper_vjp_sums(xs, xs, state, element, flags, xs, {}, ("lr",), linear=linear) is None
    )
    off = {**hp, "lr": 0.0}
    assert rule.hyper_vjp_sums(xs, xs, state, off, flags, xs, {}, ("eps",), linear=linear) is None
    half = [x.half() for x in xs]  # a float16 sum of products overflows: summed in float64
    half_state = {"step": state["step"], "exp_avg": half, "exp_avg_sq": half}
    half_linear = rule.linearise(half, half, half_state, hp, flags)
    sums = rule.hyper_vjp_sums(half, half, half_state, hp, flags, half, {}, ("lr",), half_linear)
    assert sums is None


def test_half_precision_sums_go_to_the_element_wise_products() -> None:
    """SGD's sums decline float16 and bfloat16 weights too (the element-wise products sum in
    float64: a float16 inner product of 400k products of 1e-3 already overflows)."""
    xs = [torch.ones(3, dtype=dtype) for dtype in (torch.float16, torch.bfloat16)]
    hp: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    flags = {"dampening": 0.0, "nesterov": False, "maximize": False}
    for x in xs:
        state = {"momentum_buffer": [x]}
        assert SGDRule().hyper_vjp_sums([x], [x], state, hp, flags, [x], {}, ("lr",)) is None
    wide = [torch.ones(3)]
    state = {"momentum_buffer": wide}
    assert SGDRule().hyper_vjp_sums(wide, wide, state, hp, flags, wide, {}, ("lr",)) is not None


def test_adam_ift_takes_its_sums_from_the_kept_linearisation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HyperAdam's ift at scalar granularity, learning lr and eps, reduces its products from
    the series' linearisation: the element-wise ``hyper_vjp`` is never called."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the element-wise products were taken")

    monkeypatch.setattr(AdamRule, "hyper_vjp", refuse)
    model = _Model()
    gen = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(16, 5, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, dtype=torch.float64, generator=gen),
    )
    opt = HyperAdam(model.parameters(), lr=0.01, learn=("lr", "eps"), method="ift",
                    update_interval=2, hvp="autograd")  # fmt: skip
    before = opt.hyperparameters()
    for _ in range(4):
        opt.step(
            lambda: ((model(x) - y) ** 2).mean(), val_closure=lambda: ((model(x) - y) ** 2).mean()
        )
    assert opt.hyperparameters() != before  # two hyper-steps moved lr and eps
