"""The penalty registry: properties of every family, closed forms, real scales, registry API."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysae.core.penalties import (
    DEFAULT_GRAD_FLOOR,
    PENALTIES,
    PenaltyParam,
    get_penalty,
    penalty_family,
    penalty_label,
    penalty_per_token,
    penalty_scale_at_one,
    reference_points,
    register_penalty,
)

NAMES = list(PENALTIES)
FINITE_POINTS = [0.0, 1e-30, 1e-8, 1.0, 1e4]
# Parameter draws stay inside the allowed range, within a box where fp32 can hold every
# value on FINITE_POINTS (an eps of 1e300 would overflow eps^p, not a setting anyone uses).
BOX = (1e-4, 1e3)
NONNEG = st.one_of(
    st.sampled_from([*FINITE_POINTS, 1e-45, 1e-4]),
    st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False),
)


def _param_strategy(param: PenaltyParam):
    specials = [param.default, *(param.search or ())]
    if param.low_inclusive:
        specials.append(param.low)
    if param.high_inclusive and math.isfinite(param.high):
        specials.append(param.high)
    lo, hi = max(param.low, BOX[0]), min(param.high, BOX[1])
    log_uniform = st.floats(math.log(lo), math.log(hi)).map(math.exp)
    drawn = log_uniform if param.log else st.floats(lo, hi)
    return st.one_of(st.sampled_from(specials), drawn).filter(param.contains)


def _params(name):
    return st.fixed_dictionaries({p.name: _param_strategy(p) for p in PENALTIES[name].params})


def _value_and_grad(name, f, params, **kw):
    f = f.clone().requires_grad_(True)
    value = penalty_per_token(name, f, params, **kw)
    value.sum().backward()
    return value.detach(), f.grad


# -- properties of every registered family ------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_zero_at_zero_with_finite_gradient(name, data):
    params = data.draw(_params(name))
    value, grad = _value_and_grad(name, torch.zeros(3, 5), params)
    assert torch.equal(value, torch.zeros(3))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), xs=st.lists(NONNEG, min_size=2, max_size=24))
def test_non_decreasing_in_f(name, data, xs):
    params = data.draw(_params(name))
    f = torch.tensor(sorted(xs), dtype=torch.float32).unsqueeze(-1)
    value = penalty_per_token(name, f, params)
    assert (value[1:] >= value[:-1]).all(), (params, f.flatten(), value)
    assert (value >= 0).all()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_finite_value_and_gradient_on_edge_inputs(name, autocast, data):
    params = data.draw(_params(name))
    leaf = torch.tensor([FINITE_POINTS], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        f = leaf.bfloat16() if autocast else leaf
        value = penalty_per_token(name, f, params)
        assert value.dtype == torch.float32
        value.sum().backward()
    assert torch.isfinite(value).all() and (value >= 0).all(), (params, value)
    assert torch.isfinite(leaf.grad).all(), (params, leaf.grad)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_ladder_penalty_shape_matches_per_member(name, data):
    params = data.draw(_params(name))
    f = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2
    f[f < 0.5] = 0.0
    out = penalty_per_token(name, f, params)
    assert out.shape == (3, 5)
    for k in range(3):
        assert torch.allclose(out[k], penalty_per_token(name, f[k], params))


def test_negative_inputs_count_as_zero():
    x = torch.tensor([[-1.0, 0.0, 1e-30, 2.0]], requires_grad=True)
    for name in NAMES:
        penalty_per_token(name, x, {}).sum().backward()
        assert torch.isfinite(x.grad).all()
        x.grad = None
        assert torch.equal(penalty_per_token(name, x, {}),
                           penalty_per_token(name, x.clamp_min(0), {}))


# -- closed forms ---------------------------------------------------------------------------

F = torch.tensor([[0.0, 1e-8, 1e-5, 1e-3, 0.05, 0.3], [1.0, 4.0, 100.0, 0.7, 0.01, 2.5]])
F64 = F.double()


@pytest.mark.parametrize("p, closed", [(1.0, lambda f: f), (0.5, torch.sqrt),
                                       (0.25, lambda f: f**0.25)])
def test_power_at_eps_zero_is_the_pure_power(p, closed):
    value, grad = _value_and_grad("power", F, {"p": p, "eps": 0.0})
    assert torch.allclose(value.double(), closed(F64).sum(-1), rtol=1e-6, atol=0)
    above = F >= DEFAULT_GRAD_FLOOR  # exact gradient wherever the floor is not reached
    expected = p * F64[above] ** (p - 1)
    assert torch.allclose(grad[above].double(), expected, rtol=1e-5)


def test_pure_power_gradient_is_floored_only_below_grad_floor():
    f = torch.tensor([[0.0, 1e-30, 1e-8]])
    _, grad = _value_and_grad("power", f, {"p": 0.5, "eps": 0.0})
    assert torch.allclose(grad, torch.full_like(grad, 0.5 * DEFAULT_GRAD_FLOOR ** -0.5))
    _, grad = _value_and_grad("power", f, {"p": 0.5, "eps": 0.0}, grad_floor=1e-6)
    assert torch.allclose(grad, torch.full_like(grad, 0.5 * 1e-6 ** -0.5))


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9, 1.5, 2.0])
@pytest.mark.parametrize("eps", [1e-3, 0.01, 0.1, 1.0])
def test_power_at_eps_positive_matches_float64_closed_form(p, eps):
    value, grad = _value_and_grad("power", F, {"p": p, "eps": eps})
    expected = ((F64 + eps) ** p - eps**p).sum(-1)
    assert torch.allclose(value.double(), expected, rtol=2e-6, atol=0)
    expected_grad = p * (F64 + eps) ** (p - 1)
    assert torch.allclose(grad.double(), expected_grad, rtol=2e-6, atol=0)


def test_power_eps_positive_is_accurate_where_the_naive_difference_cancels():
    f = torch.tensor([[1e-8], [1e-6], [1e-4]])
    value = penalty_per_token("power", f, {"p": 0.5, "eps": 1.0})
    expected = ((f.double() + 1.0) ** 0.5 - 1.0).squeeze(-1)  # ~ f / 2
    assert torch.allclose(value.double(), expected, rtol=1e-6, atol=0)
    naive = ((f + 1.0) ** 0.5 - 1.0).squeeze(-1)  # fp32 cancellation: 0 or 100% off
    assert not torch.allclose(naive.double(), expected, rtol=1e-2, atol=0)


def test_power_eps_positive_gradient_at_zero_is_the_knee_slope_not_the_floor():
    for floor in (1e-4, 1e-8):
        _, grad = _value_and_grad("power", torch.zeros(1, 2), {"p": 0.5, "eps": 0.01},
                                  grad_floor=floor)
        assert torch.allclose(grad, torch.full_like(grad, 0.5 * 0.01 ** -0.5))


@pytest.mark.parametrize("eps", [0.0, 0.01, 3.0])
def test_power_p_one_is_exactly_l1_for_every_eps(eps):
    f = torch.rand(4, 9)
    assert torch.equal(penalty_per_token("power", f, {"p": 1.0, "eps": eps}), f.sum(-1))


@pytest.mark.parametrize("c", [0.1, 1.0, 30.0])
def test_tanh_closed_form(c):
    value, grad = _value_and_grad("tanh", F, {"c": c})
    assert torch.allclose(value.double(), torch.tanh(c * F64).sum(-1), rtol=1e-6, atol=1e-7)
    # autograd's c (1 - tanh^2) is exact to fp32 rounding of tanh: absolute error ~ c * 2^-23
    assert torch.allclose(grad.double(), c / torch.cosh(c * F64) ** 2, rtol=1e-5, atol=c * 3e-7)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_log_closed_form(eps):
    value, grad = _value_and_grad("log", F, {"eps": eps})
    assert torch.allclose(value.double(), torch.log1p(F64 / eps).sum(-1), rtol=2e-6, atol=0)
    assert torch.allclose(grad.double(), 1.0 / (F64 + eps), rtol=2e-6, atol=0)


def test_log_is_the_p_to_zero_limit_of_the_shifted_power():
    p, eps = 1e-3, 0.1
    shifted = penalty_per_token("power", F, {"p": p, "eps": eps}).double() / p
    assert torch.allclose(shifted, penalty_per_token("log", F, {"eps": eps}).double(), rtol=1e-2)


# -- a scale parameter changes the shape (is not absorbed by lambda) -------------------------

GRID = torch.from_numpy(np.geomspace(1e-3, 10.0, 41)).float().unsqueeze(-1)


def _ratio_spread(name, a, b):
    """max / min over f of rho_a(f) / rho_b(f): 1 iff the two differ by a constant factor."""
    ratio = (penalty_per_token(name, GRID, a).double()
             / penalty_per_token(name, GRID, b).double())
    return (ratio.max() / ratio.min()).item()


def _thirds(param):
    lo, hi = param.search
    if param.log:
        return [math.exp(math.log(lo) + k * (math.log(hi) - math.log(lo)) / 3) for k in (1, 2)]
    return [lo + k * (hi - lo) / 3 for k in (1, 2)]


def _middle(param):
    if param.search is None:
        return param.default
    lo, hi = param.search
    return math.sqrt(lo * hi) if param.log else (lo + hi) / 2


SCALES = [(spec.name, p.name) for spec in PENALTIES.values()
          for p in spec.searched_params() if p.log]


def test_every_family_declares_a_scale():
    assert {"power", "tanh", "log"} <= {name for name, _ in SCALES}
    assert ("power", "eps") in SCALES and ("power", "p") not in SCALES


@pytest.mark.parametrize("name, scale", SCALES)
def test_scale_parameter_is_not_absorbable_into_lambda(name, scale):
    """For two scale values from its searched range (1/3 and 2/3 of it, other searched
    parameters at the middle of theirs: power p=0.55 eps 0.01 vs 0.1, tanh c 1 vs 10,
    log eps 0.01 vs 0.1), rho_a / rho_b varies with f over [1e-3, 10]."""
    spec = get_penalty(name)
    base = {p.name: _middle(p) for p in spec.params}
    param = next(p for p in spec.params if p.name == scale)
    a, b = _thirds(param)
    assert _ratio_spread(name, {**base, scale: a}, {**base, scale: b}) > 1.5


def test_the_pure_powers_scale_is_absorbed_which_the_check_detects():
    """lambda (s f)^p = (lambda s^p) f^p: scaling the input of a pure power is a constant."""
    for p in (0.25, 0.5):
        params = {"p": p, "eps": 0.0}
        ratio = (penalty_per_token("power", 0.1 * GRID, params).double()
                 / penalty_per_token("power", GRID, params).double())
        assert torch.allclose(ratio, torch.full_like(ratio, 0.1**p), rtol=1e-5)


# -- references, labels, validation, registration -------------------------------------------

def test_reference_points_are_the_studys_l1_sqrt_and_sqrt_sqrt():
    points = reference_points()
    assert points[:3] == [("L1", "power", {"p": 1.0, "eps": 0.0}),
                          ("sqrt", "power", {"p": 0.5, "eps": 0.0}),
                          ("sqrt(sqrt)", "power", {"p": 0.25, "eps": 0.0})]
    assert len({label for label, _, _ in points}) == len(points)
    for label, name, params in points:
        assert penalty_family(name, params) == label == penalty_label(name, params)


def test_searched_ranges_are_the_documented_ones():
    searched = {(name, p.name): (p.search, p.log)
                for name, spec in PENALTIES.items() for p in spec.searched_params()}
    assert searched == {("power", "p"): ((0.1, 1.0), False),
                        ("power", "eps"): ((1e-3, 1.0), True),
                        ("tanh", "c"): ((0.1, 100.0), True),
                        ("log", "eps"): ((1e-3, 1.0), True)}


def test_family_and_labels():
    assert penalty_family("power", {"p": 1.0, "eps": 0.0}) == "L1"
    assert penalty_family("power", {"p": 1.0, "eps": 0.3}) == "L1"  # exactly f
    assert penalty_family("power", {"p": 0.5}) == "sqrt"  # eps defaults to 0
    assert penalty_family("power", {"p": 0.25, "eps": 0.0}) == "sqrt(sqrt)"
    assert penalty_family("power", {"p": 0.5, "eps": 0.01}) == "power"
    assert penalty_family("power", {"p": 0.7}) == "power"
    assert penalty_family("tanh", {"c": 3.0}) == "tanh"
    assert penalty_family("log", {}) == "log"
    assert penalty_label("power", {"p": 0.5, "eps": 0.01}) == "power(p=0.5, eps=0.01)"
    assert penalty_label("power", {"p": 1.0, "eps": 0.3}) == "L1"
    assert penalty_label("tanh", {"c": 3.0}) == "tanh(c=3)"
    assert penalty_label("log", {"eps": 0.1}) == "log(eps=0.1)"


@pytest.mark.parametrize("name, params, expected", [
    ("power", {"p": 1.0, "eps": 0.5}, 1.0),
    ("power", {"p": 0.5, "eps": 0.0}, 1.0),
    ("power", {"p": 0.5, "eps": 0.01}, math.sqrt(1.01) - 0.1),
    ("tanh", {"c": 3.0}, math.tanh(3.0)),
    ("log", {"eps": 0.1}, math.log(11.0)),
])
def test_scale_at_one(name, params, expected):
    assert penalty_scale_at_one(name, params) == pytest.approx(expected, rel=1e-12)


def test_validation_names_the_field_and_range():
    power = get_penalty("power")
    assert power.validate({"p": 0.5}) == {"p": 0.5, "eps": 0.0}
    with pytest.raises(ValueError, match=r"penalty\.p = 0.*'power': allowed \(0, 2\]"):
        power.validate({"p": 0.0})
    with pytest.raises(ValueError, match=r"penalty\.p = 2\.5"):
        power.validate({"p": 2.5})
    with pytest.raises(ValueError, match=r"penalty\.eps = -1.*allowed \[0, inf\)"):
        power.validate({"eps": -1.0})
    with pytest.raises(ValueError, match=r"penalty\.eps = inf"):
        power.validate({"eps": math.inf})
    with pytest.raises(ValueError, match=r"penalty\.c = 0.*'tanh': allowed \(0, inf\)"):
        get_penalty("tanh").validate({"c": 0.0})
    with pytest.raises(ValueError, match=r"penalty\.eps = 0.*'log': allowed \(0, inf\)"):
        get_penalty("log").validate({"eps": 0.0})
    with pytest.raises(ValueError, match=r"no parameter 's'; its parameters are: \['eps', 'p'\]"):
        power.validate({"s": 1.0})
    with pytest.raises(ValueError, match=r"registered penalties: \['log', 'power', 'tanh'\]"):
        get_penalty("lp")
    with pytest.raises(ValueError, match=r"penalty\.c"):
        penalty_per_token("tanh", torch.ones(1, 2), {"c": -1.0})


def test_param_declarations_are_checked():
    with pytest.raises(ValueError, match="default"):
        PenaltyParam("q", 0.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="search range"):
        PenaltyParam("q", 0.0, 1.0, 0.5, search=(0.5, 2.0))
    with pytest.raises(ValueError, match="log-uniform"):
        PenaltyParam("q", 0.0, 1.0, 0.5, low_inclusive=True, log=True, search=(0.0, 1.0))
    param = PenaltyParam("q", 0.0, 1.0, 0.5)
    assert param.range_text() == "(0, 1]" and param.contains(1.0) and not param.contains(0.0)
    assert not param.contains(float("nan")) and not param.contains(True)


def test_registering_a_family_is_one_decorated_function():
    name = "test_scaled_log"
    try:
        @register_penalty(
            name,
            PenaltyParam("k", 0.0, 10.0, 1.0, log=True, search=(0.1, 10.0)),
            PenaltyParam("unsearched", 0.0, 1.0, 1.0),
            references={"plain": {"k": 1.0}},
        )
        def scaled_log(f, *, k, unsearched, grad_floor=DEFAULT_GRAD_FLOOR):
            """sum_i log(1 + k f_i)."""
            return torch.log1p(k * f).sum(-1)

        spec = get_penalty(name)
        assert spec.doc == "sum_i log(1 + k f_i)."
        assert [p.name for p in spec.searched_params()] == ["k"]
        assert spec.references == {"plain": {"k": 1.0, "unsearched": 1.0}}
        assert ("plain", name, {"k": 1.0, "unsearched": 1.0}) in reference_points()
        assert penalty_family(name, {}) == "plain" and penalty_family(name, {"k": 2.0}) == name
        out = penalty_per_token(name, torch.ones(2, 3), {})
        assert torch.allclose(out, torch.full((2,), 3 * math.log(2)))
        with pytest.raises(ValueError, match="already registered"):
            register_penalty(name)(scaled_log)
        with pytest.raises(ValueError, match=r"penalty\.k = 20"):
            register_penalty("test_bad_ref", PenaltyParam("k", 0.0, 10.0, 1.0),
                             references={"bad": {"k": 20.0}})(scaled_log)
        assert "test_bad_ref" not in PENALTIES
        with pytest.raises(ValueError, match=r"rho\(0\) != 0"):  # the sparse step skips zeros
            register_penalty("test_nonzero_at_0")(lambda f, grad_floor: (f + 1).sum(-1))
        assert "test_nonzero_at_0" not in PENALTIES
    finally:
        PENALTIES.remove(name)
