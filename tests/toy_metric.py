"""A toy metric from outside raysae, a plugin (``RAYSAE_PLUGINS=tests.toy_metric``): importing
it registers the metric, in the test process and in each Ray trial that imports the driver's
plugins. tests/test_metric_table.py checks that it reaches the evaluator, trials.parquet,
the report and the progress table with no other edit."""

import torch

from raysae.core.metrics import METRICS, register_metric

MODULE, NAME = "tests.toy_metric", "max_abs_err"


@register_metric(NAME, "largest |x - x_hat| of a token", frontier=True, progress="max|err|")
def max_abs_err(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).abs().amax(dim=-1)


METRIC = METRICS[NAME]
"""Kept so a test can register it again after removing it (the module imports once)."""
