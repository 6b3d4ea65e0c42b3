"""The penalty registry: closed forms, finiteness everywhere, registry behaviour."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysae.core.penalties import (
    PENALTIES,
    get_penalty,
    penalty_family,
    penalty_per_token,
    register_penalty,
)

P_VALUES = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
S_VALUES = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
NONNEG = st.one_of(
    st.just(0.0), st.just(1e-30), st.just(1e-45),
    st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False),
)


def _value_and_grad(f, params, name="lp"):
    f = f.clone().requires_grad_(True)
    value = penalty_per_token(name, f, params).sum()
    value.backward()
    return value, f.grad


@settings(max_examples=200, deadline=None)
@given(p=P_VALUES, s=S_VALUES, xs=st.lists(NONNEG, min_size=1, max_size=16))
def test_value_and_gradient_finite_for_every_p_and_nonnegative_input(p, s, xs):
    f = torch.tensor([xs], dtype=torch.float32)
    value, grad = _value_and_grad(f, {"p": p, "s": s})
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all()
    assert value >= 0


@settings(max_examples=50, deadline=None)
@given(p=P_VALUES, xs=st.lists(NONNEG, min_size=1, max_size=8))
def test_finite_under_autocast_with_low_precision_input(p, xs):
    f = torch.tensor([xs], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f32 = f.float().requires_grad_(True)
        value = penalty_per_token("lp", f32.bfloat16(), {"p": p, "s": 1.0}).sum()
        assert value.dtype == torch.float32
        value.backward()
    assert torch.isfinite(value) and torch.isfinite(f32.grad).all()


def test_relu_zeros_and_masked_zeros_give_finite_grads():
    """Zeros made by a mask (x * (x > 0)) are the case that NaNs a naive x ** p."""
    x = torch.tensor([[-1.0, 0.0, 1e-30, 2.0]], requires_grad=True)
    f = x * (x > 0)
    penalty_per_token("lp", f, {"p": 0.25, "s": 0.1}).sum().backward()
    assert torch.isfinite(x.grad).all()
    naive = torch.tensor([[-1.0, 0.0, 2.0]], requires_grad=True)
    (naive * (naive > 0)).pow(0.25).sum().backward()
    assert not torch.isfinite(naive.grad).all()  # the trap exists; our penalty avoids it


@pytest.mark.parametrize("p", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("s", [0.1, 1.0])
def test_matches_closed_form_value_and_gradient(p, s):
    f = torch.tensor([[0.05, 0.3, 1.0, 4.0], [2.5, 0.0, 0.7, 0.01]])
    value, grad = _value_and_grad(f, {"p": p, "s": s})
    expected = ((s * f) ** p).sum()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    positive = f > 0
    expected_grad = p * s**p * f[positive] ** (p - 1)
    assert torch.allclose(grad[positive], expected_grad, rtol=1e-5)


def test_study_sqrt_point_is_p_half_s_tenth():
    f = torch.tensor([[0.01, 0.1, 2.0]])
    value = penalty_per_token("lp", f, {"p": 0.5, "s": 0.1})
    assert value.item() == pytest.approx(sum(math.sqrt(0.1 * v) for v in (0.01, 0.1, 2.0)),
                                         rel=1e-6)


def test_l1_is_lp_with_p1_s1():
    f = torch.rand(5, 7)
    assert torch.allclose(penalty_per_token("l1", f, {}), penalty_per_token("lp", f, {}))
    assert torch.allclose(penalty_per_token("l1", f, {}), f.sum(-1))


def test_gradient_is_floored_not_infinite_near_zero():
    f = torch.tensor([[0.0, 1e-30, 1e-8]])
    _, grad = _value_and_grad(f, {"p": 0.5, "s": 1.0})
    cap = 0.5 * 1e-4 ** -0.5
    assert torch.allclose(grad, torch.full_like(grad, cap))


def test_validation_names_the_field_and_range():
    spec = get_penalty("lp")
    with pytest.raises(ValueError, match=r"penalty\.p = 0.*\(0, 2\]"):
        spec.validate({"p": 0.0})
    with pytest.raises(ValueError, match=r"penalty\.p = 2\.5"):
        spec.validate({"p": 2.5})
    with pytest.raises(ValueError, match=r"penalty\.s = -1"):
        spec.validate({"s": -1.0})
    with pytest.raises(ValueError, match="has no parameter 'q'"):
        spec.validate({"q": 1.0})
    with pytest.raises(ValueError, match="registered penalties"):
        get_penalty("nope")


def test_registering_a_penalty_is_one_decorated_function():
    name = "test_log1p"
    try:
        @register_penalty(name)
        def log1p_penalty(f, *, grad_floor=1e-4):
            """sum_i log(1 + f_i)."""
            return torch.log1p(f).sum(-1)

        assert name in PENALTIES and get_penalty(name).doc == "sum_i log(1 + f_i)."
        out = penalty_per_token(name, torch.ones(2, 3), {})
        assert torch.allclose(out, torch.full((2,), 3 * math.log(2)))
        with pytest.raises(ValueError, match="already registered"):
            register_penalty(name)(log1p_penalty)
    finally:
        PENALTIES.pop(name, None)


def test_family_labels():
    assert penalty_family("lp", {"p": 1.0, "s": 0.3}) == "L1"
    assert penalty_family("l1", {}) == "L1"
    assert penalty_family("lp", {"p": 0.5, "s": 1.0}) == "sqrt"
    assert penalty_family("lp", {"p": 0.25, "s": 1.0}) == "sqrt(sqrt)"
    assert penalty_family("lp", {"p": 0.5, "s": 0.1}) == "searched"
