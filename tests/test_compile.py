"""A compiled step equals the eager one (issue #38): ``TrainConfig.compile = "on"`` runs the
dense step's forward, loss terms and backward through torch.compile (Inductor); over steps
that include logging steps every kind, penalty family and recipe ends where the eager
reference ends, to float tolerance: weights, Adam-driven lambdas, dead-feature counters and
the logged history. The compiled step does not recompile as training moves (p-annealing's p
and the dead window are tensors). Two cases run in the default suite, the rest are slow
(Inductor compiles each for 5-10 s on 2 cores)."""

import pytest
from planted import planted_batches

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.ladder import LadderTrainer

CASES = {
    "relu-sqrt": {"penalty": PenaltyConfig.power(0.5)},
    "topk": {"kind": "topk"},
    "relu-L1": {"penalty": PenaltyConfig.power(1.0)},
    "relu-sqrt(sqrt)": {"penalty": PenaltyConfig.power(0.25)},
    "relu-power-eps": {"penalty": PenaltyConfig.power(0.3, 0.1)},
    "relu-tanh": {"penalty": PenaltyConfig("tanh", {"c": 2.0})},
    "relu-log": {"penalty": PenaltyConfig("log", {"eps": 0.1})},
    "relu-sqrt-study": {"penalty": PenaltyConfig.power(0.5), "recipe": "study"},
    "relu-L1-saelens": {"penalty": PenaltyConfig.power(1.0), "recipe": "saelens"},
    "panneal": {"kind": "panneal", "penalty": PenaltyConfig.power(0.4)},
    "batchtopk": {"kind": "batchtopk"},
    "jumprelu": {"kind": "jumprelu"},
    "matryoshka": {"kind": "matryoshka"},
    "gated": {"kind": "gated"},
}
FAST = ("relu-sqrt", "topk")
GRAPHS = {"jumprelu": 5, "batchtopk": 2, "matryoshka": 2}
"""Graphs a kind may compile: its first step (JumpReLU sets its thresholds there), the
controller's end, BatchTopK's per-batch-size selection; one for the others."""


def _train(case: str, compiled: bool) -> LadderTrainer:
    cfg = TrainConfig(sae=SAEConfig(16, 64), lam=0.1, total_tokens=64 * 24, batch_size=64,
                      lr=3e-3, log_every=8, seed=3, sparse_step="off", control_frac=0.6,
                      compile="on" if compiled else "off", **CASES[case])
    trainer = LadderTrainer(cfg, [4.0, 8.0, 16.0])
    for x in planted_batches(16, 48, 4, 64, seed=2, steps=24):
        trainer.step(x)
    return trainer


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow)
                                  for c in CASES])
def test_compiled_step_equals_the_eager_one(case):
    import torch._dynamo

    eager = _train(case, compiled=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _train(case, compiled=True)
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= GRAPHS.get(case, 1), graphs  # no recompiling as training moves
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[name].float(), value.float(),
                                   rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(compiled.lam, eager.lam, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(compiled.last_fired, eager.last_fired)
    for ours, theirs in zip(compiled.history, eager.history, strict=True):
        assert len(ours) == len(theirs) == 3  # the three logging steps
        for row, ref in zip(ours, theirs, strict=True):
            for key in ("l0", "mse", "loss", "penalty_loss", "lam", "dead_fraction"):
                assert row[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-5), key
