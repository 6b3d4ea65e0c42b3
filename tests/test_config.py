"""Config validation: bad values fail early, naming the field and the allowed range."""

import pytest

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig


def _cfg(**kw):
    return TrainConfig(sae=SAEConfig(8, 16), total_tokens=64, batch_size=8, **kw)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: PenaltyConfig.power(p=0.0), r"penalty\.p = 0\.0 .*allowed \(0, 2\]"),
        (lambda: PenaltyConfig.power(p=2.01), r"penalty\.p"),
        (lambda: PenaltyConfig.power(eps=-0.1), r"penalty\.eps = -0\.1 .*allowed \[0, inf\)"),
        (lambda: PenaltyConfig("tanh", {"c": 0.0}), r"penalty\.c = 0\.0 .*allowed \(0, inf\)"),
        (lambda: PenaltyConfig("lp", {"p": 0.5}), r"unknown penalty 'lp'.*'power'"),
        (lambda: _cfg(lam=-0.1), r"lam = -0\.1 is invalid: allowed a number >= 0"),
        (lambda: SAEConfig(8, 0), r"sae\.d_sae = 0 .*integer >= 1"),
        (lambda: SAEConfig(8, 2.5), r"sae\.d_sae = 2\.5"),
        (lambda: TrainConfig(sae=SAEConfig(8, 16), batch_size=0), r"batch_size = 0"),
        (lambda: _cfg(l0_target=0.0), r"l0_target = 0\.0 .*d_sae=16"),
        (lambda: _cfg(l0_target=17), r"l0_target = 17"),
        (lambda: _cfg(lr=0), r"lr = 0"),
        (lambda: _cfg(control_frac=1.5), r"control_frac = 1\.5"),
        (lambda: TrainConfig(sae=SAEConfig(8, 16), batch_size=8, total_tokens=4),
         r"total_tokens = 4 .*batch_size \(8\)"),
    ],
)
def test_bad_values_raise_value_error_naming_field(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_round_trip_through_dict_and_defaults_filled():
    cfg = _cfg(penalty=PenaltyConfig("power", {"p": 0.5}), l0_target=4.0)
    assert cfg.penalty.params == {"p": 0.5, "eps": 0.0}
    assert cfg.penalty.family == cfg.penalty.label == "sqrt"
    assert PenaltyConfig().params == {"p": 1.0, "eps": 0.0} and PenaltyConfig().label == "L1"
    assert PenaltyConfig.power(0.5, 0.01).label == "power(p=0.5, eps=0.01)"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.total_steps == 8
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_frozen():
    cfg = _cfg()
    with pytest.raises(AttributeError):
        cfg.lam = 1.0
