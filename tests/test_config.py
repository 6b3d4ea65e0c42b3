"""Config validation: bad values fail early, naming the field and the allowed range."""

import dataclasses
import math

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
        (lambda: _cfg(lam=-0.1), r"lam -0\.1 is invalid: must be a number >= 0"),
        (lambda: SAEConfig(8, 0), r"sae\.d_sae 0 .*integer >= 1"),
        (lambda: SAEConfig(8, 2.5), r"sae\.d_sae 2\.5"),
        (lambda: PenaltyConfig("power", {"p": 0.5}, grad_floor=math.inf), r"grad_floor inf"),
        (lambda: TrainConfig(sae=SAEConfig(8, 16), batch_size=0),
         r"batch_size 0 is invalid: must be an integer >= 1"),
        (lambda: _cfg(l0_target=0.0), r"l0_target 0 is invalid.*d_sae=16"),
        (lambda: _cfg(l0_target=17), r"l0_target 17 is invalid"),
        (lambda: _cfg(lr=0), r"lr 0 is invalid"),
        (lambda: _cfg(control_frac=1.5), r"control_frac 1\.5 is invalid"),
        (lambda: TrainConfig(sae=SAEConfig(8, 16), batch_size=8, total_tokens=4),
         r"total_tokens 4 is invalid: smaller than one batch \(batch_size 8\)"),
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


def test_setting_error_renders_fields_as_flags():
    from raysae.settings import SettingError, flag_name

    with pytest.raises(SettingError) as info:
        TrainConfig(sae=SAEConfig(8, 16), batch_size=256, total_tokens=100)
    assert str(info.value) == ("total_tokens 100 is invalid: smaller than one batch "
                               "(batch_size 256); raise total_tokens or lower batch_size")
    assert info.value.render(flag_name) == ("--total-tokens 100 is invalid: smaller than one "
                                            "batch (--batch-size 256); raise --total-tokens "
                                            "or lower --batch-size")


def test_every_training_field_is_documented():
    """A setting is one documented field: the CLI's help comes from these docstrings."""
    from raysae.search.config import SECTIONS
    from raysae.settings import field_docs

    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
