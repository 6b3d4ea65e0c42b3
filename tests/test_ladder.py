"""LadderTrainer: a ladder of K equals K ladders of one, controls each member's L0, isolates
a diverging member, resumes exactly, and never syncs with the host between logging steps."""


import pytest
import torch
from planted import planted_batches

from raysae.core.config import PenaltyConfig, SAEConfig, TrainConfig
from raysae.core.kinds import KINDS
from raysae.core.ladder import LadderTrainer
from raysae.core.ladder_sae import LadderSAE
from raysae.core.outcome import DIVERGED, FINISHED, CheckpointError
from raysae.core.sae import SAE
from raysae.core.training import ladder_of_one, train_ladder

D_IN, D_SAE, N_TRUE, K_ACTIVE = 16, 64, 32, 4


def _planted(batch_size=256, seed=1, steps=None):
    return planted_batches(D_IN, N_TRUE, K_ACTIVE, batch_size, seed, steps)


def _cfg(**kw):
    base = dict(sae=SAEConfig(D_IN, D_SAE), penalty=PenaltyConfig.power(p=0.5), lam=0.3,
                total_tokens=256 * 40, batch_size=256, lr=3e-3, log_every=10, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_members_match_seeded_saes_in_init_forward_and_gradients():
    model = LadderSAE(SAEConfig(D_IN, D_SAE), [5, 7])
    for k, seed in enumerate([5, 7]):
        ref, got = SAE(SAEConfig(D_IN, D_SAE), seed=seed), model.member(k)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(ref, name), getattr(got, name))
    with torch.no_grad():
        model.b_dec.normal_(), model.b_enc.normal_(std=0.1)
    x = torch.randn(8, D_IN)
    ref = model.member(1)
    x_hat, f = model(x)
    ref_hat, ref_f = ref(x)
    torch.testing.assert_close(x_hat[1], ref_hat, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(f[1], ref_f, atol=1e-6, rtol=1e-6)
    ((x_hat - x).pow(2).sum() + f.sqrt().sum()).backward()
    ((ref_hat - x).pow(2).sum() + ref_f.sqrt().sum()).backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(model, name).grad[1], getattr(ref, name).grad,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("control_frac", [0.0, 0.8])  # fixed lambdas, then controlled
def test_ladder_of_k_equals_k_ladders_of_one(control_frac):
    targets, lams = [2.0, 4.0, 8.0], [0.05, 0.2, 0.8]
    cfg = _cfg(total_tokens=256 * 20, control_frac=control_frac, lr_decay_frac=0.5,
               log_every=7)
    batches = list(_planted(steps=20))
    ens = LadderTrainer(cfg, targets, lams=lams)
    singles = [LadderTrainer(cfg, [t], lams=[lam]) for t, lam in zip(targets, lams, strict=True)]
    for x in batches:
        ens.step(x)
        for trainer in singles:
            trainer.step(x)
    assert ens.done and ens.step_count == 20
    for k, trainer in enumerate(singles):
        assert ens.scale == trainer.scale
        assert ens.lam[k].item() == pytest.approx(trainer.lam[0].item())
        member, alone = ens.model.member(k), trainer.model.member(0)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(member, name), getattr(alone, name),
                                       atol=1e-5, rtol=1e-5)
        assert ens.history[k][-1]["l0"] == pytest.approx(trainer.history[0][-1]["l0"], abs=0.05)


def test_ladder_of_one_maps_a_missing_target_to_a_fixed_lambda():
    """One SAE: its target under the controller, or (no target) the fixed ``cfg.lam``,
    unscaled by 1 / rho(1) and ramped up over ``lam_warmup_frac``."""
    controlled = ladder_of_one(_cfg(l0_target=4.0))
    assert controlled.targets == [4.0] and controlled.controlled
    fixed = ladder_of_one(_cfg(penalty=PenaltyConfig.power(0.5, 0.5), lam=0.2,
                               lam_warmup_frac=0.5, total_tokens=256 * 4))
    assert fixed.targets == [D_SAE] and not fixed.controlled
    assert fixed.current_lam().tolist() == pytest.approx([0.1])  # step 1 of a 2-step ramp
    assert fixed.current_lam(step=3).tolist() == pytest.approx([0.2])
    with pytest.raises(ValueError, match="no lambda"):
        ladder_of_one(_cfg(kind="topk"))


def test_controller_puts_each_member_near_its_target():
    targets = [2.0, 4.0, 8.0]
    cfg = _cfg(penalty=PenaltyConfig.power(1.0), lam=0.3, total_tokens=256 * 600,
               log_every=100)  # controls 480 steps at the default gain
    results = train_ladder(cfg, targets, _planted())
    x = next(_planted(batch_size=4096, seed=99))
    for target, res in zip(targets, results, strict=True):
        assert res.status == FINISHED and res.steps == 600
        l0 = (res.sae.encode(x) > 0).float().sum(-1).mean().item()  # raw scale: folded in
        assert abs(l0 / target - 1) <= 0.15, (target, l0)
        assert res.history[-1]["target_l0"] == target


def test_one_member_diverging_leaves_the_others_training():
    cfg = _cfg(total_tokens=256 * 30)
    logged, frozen = [], None
    ens = LadderTrainer(cfg, [2.0, 4.0, 8.0])
    for step, x in enumerate(_planted(steps=30)):
        if step == 12:
            with torch.no_grad():
                ens.model.W_enc[1, 0, 0] = float("nan")
        rows = ens.step(x)
        if rows is not None:
            logged.append([r["member"] for r in rows])
        if ens.step_count == 20:  # just marked diverged: its weights stay as they are now
            frozen = [p[1].clone() for p in ens.model.parameters()]
    assert logged[0] == [0, 1, 2] and logged[1] == [0, 2] and logged[2] == [0, 2]
    results = ens.result()
    assert [r.status for r in results] == [FINISHED, DIVERGED, FINISHED]
    assert "non-finite at step 12" in results[1].reason and results[1].steps == 20
    for k in (0, 2):
        assert all(torch.isfinite(p).all() for p in results[k].sae.parameters())
        assert results[k].steps == 30
    assert torch.isfinite(ens.lam).all()
    for before, p in zip(frozen, ens.model.parameters(), strict=True):
        torch.testing.assert_close(p[1], before, equal_nan=True, atol=1e-6, rtol=1e-6)


def test_checkpoint_resume_equals_uninterrupted_run():
    cfg = _cfg(total_tokens=256 * 30)
    targets = [2.0, 6.0]
    batches = list(_planted(steps=30))
    full = LadderTrainer(cfg, targets)
    for x in batches:
        full.step(x)
    first = LadderTrainer(cfg, targets)
    for x in batches[:13]:
        first.step(x)
    blob = first.to_bytes()
    resumed = LadderTrainer.from_bytes(blob)
    for x in batches[13:]:
        resumed.step(x)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(full.model, name), getattr(resumed.model, name))
    assert torch.equal(full.lam, resumed.lam) and resumed.history == full.history
    with pytest.raises(CheckpointError):
        LadderTrainer.from_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError):
        LadderTrainer.from_bytes(blob, targets=[2.0, 7.0])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_no_host_sync_between_logging_steps(monkeypatch, kind):
    cfg = _cfg(total_tokens=256 * 200, log_every=50, kind=kind)
    ens = LadderTrainer(cfg, [2.0, 4.0, 8.0])
    batches = list(_planted(steps=101))
    ens.step(batches[0])  # the first batch estimates the activation scale (one sync)
    calls = []
    for name in ("item", "tolist", "__bool__", "cpu", "__float__", "__int__", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            calls.append((ens.step_count, _name))
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for x in batches[1:]:
        ens.step(x)
    monkeypatch.undo()
    assert calls and {step for step, _ in calls} <= {50, 100}, sorted(set(calls))[:10]
