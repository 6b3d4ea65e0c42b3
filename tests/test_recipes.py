"""Training recipes (raysae.core.recipes): the study's kept exactly, the free-norm recipe's
decoder, penalty weighting, clipping and folding, and the sparse step under both."""

import dataclasses

import pytest
import torch
from planted import planted_batches

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.kinds import get_kind
from raysae.core.ladder import LadderTrainer
from raysae.core.ladder_sae import LadderSAE
from raysae.core.penalties import penalty_per_token
from raysae.core.recipes import RECIPES, Recipe, get_recipe, register_recipe
from raysae.core.sparse_step import active_forward

D_IN, D_SAE = 16, 64
SQRT = PenaltyConfig.power(0.5)


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=SQRT, lam=0.3, total_tokens=256 * 40,
                batch_size=256, lr=3e-3, log_every=10, activation_scale=1.0)
    return TrainConfig(**{**base, **kw})


def _batches(steps=40):
    return list(planted_batches(D_IN, 32, 3, steps=steps, batch_size=256))


def _train(cfg, targets=(4.0, 8.0), steps=40):
    trainer = LadderTrainer(cfg, list(targets))
    for x in _batches(steps):
        if trainer.done:
            break
        trainer.step(x)
    return trainer


def test_registry_has_the_study_free_norm_and_saelens_recipes_default_free_norm():
    assert {"study", "free_norm", "saelens"} <= set(RECIPES)
    assert TrainConfig().recipe == "free_norm"
    with pytest.raises(ValueError, match="recipe.*must be one of"):
        _cfg(recipe="nope")
    with pytest.raises(ValueError, match="penalty_weighting"):
        Recipe("bad", True, 1.0, "sideways", None)


def test_study_recipe_keeps_unit_rows_and_the_plain_penalty():
    trainer = _train(_cfg(recipe="study", l0_target=None))
    norms = trainer.model.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    x = _batches(1)[0]
    pre = trainer.model.pre_acts(x)
    f = pre.relu()
    term, pen = get_kind("relu").loss_terms(trainer.context(), x, None, f, pre)
    torch.testing.assert_close(pen, penalty_per_token("power", f, SQRT.params).mean(-1))


@pytest.mark.parametrize(("recipe", "norm"), [("free_norm", 1.0), ("saelens", 0.1)])
def test_free_norms_start_at_the_recipes_norm_with_the_encoder_transposed(recipe, norm):
    model = LadderSAE(SAEConfig(D_IN, D_SAE), [0, 0], recipe=get_recipe(recipe))
    norms = model.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, norm))
    torch.testing.assert_close(model.W_enc, model.W_dec.transpose(1, 2))
    trainer = _train(_cfg(recipe=recipe))
    assert (trainer.model.W_dec.norm(dim=-1) - norm).abs().max() > 1e-3


@pytest.mark.parametrize("penalty", [PenaltyConfig.power(1.0), SQRT])
def test_exported_member_folds_the_norms_same_x_hat_same_features_unit_rows(penalty):
    trainer = _train(_cfg(recipe="free_norm", penalty=penalty))
    x = _batches(1)[0]
    with torch.no_grad():
        x_hat, f = trainer.model(x)
    for k in range(trainer.k):
        sae = trainer.model.member(k)
        with torch.no_grad():
            hat_k, f_k = sae(x)
        torch.testing.assert_close(hat_k, x_hat[k], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_k, f[k] * trainer.model.decoder_norms()[k].detach())
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def _penalty_of(recipe: str, model: LadderSAE, x: torch.Tensor, penalty=SQRT):
    trainer = LadderTrainer(_cfg(recipe=recipe, penalty=penalty), [4.0])
    trainer.model = model
    f = model.pre_acts(x).relu()
    return get_kind("relu").loss_terms(trainer.context(), x, None, f, None)[1]


def test_inside_weighting_is_invariant_to_rescaling_a_feature_and_outside_is_not():
    """Encoder row i x c, decoder row i / c: the same SAE. rho(f ||d||) does not see it;
    ||d|| rho(f) with p < 1 does (it shrinks by c^(p-1), a way out of the penalty)."""
    if "outside-test" not in RECIPES:
        register_recipe(dataclasses.replace(get_recipe("free_norm"), name="outside-test",
                                            penalty_weighting="outside"))
    x = torch.randn(64, D_IN)
    model = LadderSAE(SAEConfig(D_IN, D_SAE), [0], recipe=get_recipe("free_norm"))
    with torch.no_grad():
        model.b_enc += 0.5
    before = {r: _penalty_of(r, model, x) for r in ("free_norm", "outside-test")}
    with torch.no_grad():
        model.W_enc *= 4.0
        model.b_enc *= 4.0
        model.W_dec /= 4.0
    after = {r: _penalty_of(r, model, x) for r in ("free_norm", "outside-test")}
    torch.testing.assert_close(after["free_norm"], before["free_norm"])
    torch.testing.assert_close(after["outside-test"], before["outside-test"] * 4.0 ** -0.5,
                               rtol=1e-5, atol=1e-6)


def test_gradient_clipping_is_per_member_like_clip_grad_norm():
    trainer = LadderTrainer(_cfg(recipe="free_norm"), [4.0, 8.0, 16.0])
    params = list(trainer.model.parameters())
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.01, 5.0, 100.0])  # one member under the clip, two over it
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scales.view(-1, *[1] * (p.ndim - 1))
    expected = []
    for k in range(3):
        alone = [p.grad[k].clone().requires_grad_() for p in params]
        for a in alone:
            a.grad = a.detach().clone()
        torch.nn.utils.clip_grad_norm_(alone, 1.0)
        expected.append([a.grad for a in alone])
    trainer._clip_grads([p.grad for p in params], 1.0)
    for k in range(3):
        for p, want in zip(params, expected[k], strict=True):
            torch.testing.assert_close(p.grad[k], want)


@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_weighted_penalty_sparse_step_equals_the_dense_one(weighting):
    name = f"free_norm-{weighting}-test"
    if name not in RECIPES:
        register_recipe(dataclasses.replace(get_recipe("free_norm"), name=name,
                                            penalty_weighting=weighting))
    x = torch.randn(200, D_IN)
    grads = []
    for sparse in (False, True):
        trainer = LadderTrainer(_cfg(recipe=name), [4.0, 8.0])
        model = trainer.model
        with torch.no_grad():
            model.W_dec.mul_(torch.rand(model.W_dec.shape[:2], generator=torch.Generator()
                                        .manual_seed(1)).unsqueeze(-1) * 20)
            model.b_enc -= 0.05
        kind = get_kind("relu")
        if sparse:
            x_hat, active = active_forward(model, x)
            assert 0.02 < active.values.numel() / (2 * 200 * D_SAE) < 0.5  # sparse, not empty
            term, pen = kind.active_loss_terms(trainer.context(), active)
            term = term["sparsity"]
        else:
            pre = model.pre_acts(x)
            f = kind.activate(model, pre)
            x_hat = model.decode(f)
            term, pen = kind.loss_terms(trainer.context(), x, x_hat, f, pre)
            term = term["sparsity"]
        ((x_hat - x).pow(2).sum(-1).mean(-1) + term).sum().backward()
        grads.append((pen.detach(), [p.grad.clone() for p in model.parameters()]))
    (dense_pen, dense_g), (pen, g) = grads
    torch.testing.assert_close(pen, dense_pen, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, dense_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["study", "free_norm"])
def test_sparse_training_ends_at_the_dense_loss_under_each_recipe(recipe):
    runs = {}
    for mode in ("off", "on"):
        trainer = _train(_cfg(recipe=recipe, sparse_step=mode, l0_target=4.0), targets=(4.0,))
        runs[mode] = trainer.history[0][-1]
    assert runs["on"]["loss"] == pytest.approx(runs["off"]["loss"], rel=2e-3)
    assert runs["on"]["l0"] == pytest.approx(runs["off"]["l0"], rel=0.02)


def test_topk_keeps_unit_rows_under_the_free_norm_recipe():
    trainer = _train(_cfg(recipe="free_norm", kind="topk"))
    assert trainer.recipe.name == "study"
    norms = trainer.model.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_free_norm_checkpoint_round_trip_keeps_the_free_norms():
    trainer = _train(_cfg(recipe="free_norm"), steps=20)
    again = LadderTrainer.from_bytes(trainer.to_bytes())
    assert again.recipe.name == "free_norm"
    torch.testing.assert_close(again.model.W_dec, trainer.model.W_dec)
