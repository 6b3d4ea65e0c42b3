"""Train an SAE from any iterator of activation batches (no Ray here).

``train_sae(cfg, batches)`` is the whole loop; ``Trainer`` is the same loop one
step at a time, with a checkpointable state, for callers (the Ray Tune
trainable) that report and checkpoint between steps.

Loss per step: ``mean_tokens ||x_hat - x||^2 + lambda * mean_tokens(penalty(f))``
on activations scaled by one fixed factor (mean ||x||^2 = d_in) when
``normalize_activations`` is on; the factor is folded into the weights at the end.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from raysae.core import metrics
from raysae.core.config import TrainConfig
from raysae.core.penalties import penalty_per_token
from raysae.core.sae import SAE

FINISHED, DIVERGED, DATA_EXHAUSTED = "finished", "diverged", "data_exhausted"


class NonFiniteActivationsError(ValueError):
    """An activation batch holds NaN or inf: a broken model or a corrupt cache shard."""


class CheckpointError(ValueError):
    """A trainer checkpoint is truncated, corrupt, or not loadable without executing code."""


@dataclass
class TrainResult:
    """What training produced. ``sae`` reads raw activations (scale folded in)."""

    sae: SAE
    status: str
    steps: int
    tokens: int
    lam: float
    activation_scale: float
    history: list[dict[str, float]] = field(default_factory=list)
    reason: str | None = None

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


class Trainer:
    """One SAE, its optimiser and its schedule, advanced one batch at a time."""

    def __init__(self, cfg: TrainConfig):
        if cfg.sae is None:
            raise ValueError("TrainConfig.sae is None: give the SAE's shape (SAEConfig)")
        if cfg.kind != "relu":
            raise ValueError(f"Trainer trains relu SAEs only, not kind {cfg.kind!r}; use "
                             "raysae.core.ensemble.EnsembleTrainer (every kind)")
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.sae = SAE(cfg.sae, seed=cfg.seed).to(self.device)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.step_count = 0
        self.tokens = 0
        self.lam = float(cfg.lam)
        self.scale: float | None = cfg.activation_scale if cfg.normalize_activations else 1.0
        self.last_fired = torch.full((cfg.sae.d_sae,), -1.0, device=self.device,
                                     dtype=torch.float64)
        self.status: str | None = None
        self.reason: str | None = None
        self.history: list[dict[str, float]] = []

    # -- schedule -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.status is not None or self.step_count >= self.cfg.total_steps

    def current_lr(self) -> float:
        total, decay = self.cfg.total_steps, int(self.cfg.total_steps * self.cfg.lr_decay_frac)
        left = total - self.step_count
        return self.cfg.lr if decay == 0 or left > decay else self.cfg.lr * left / decay

    def current_lam(self) -> float:
        if self.cfg.l0_target is not None:
            return self.lam
        warm = int(self.cfg.total_steps * self.cfg.lam_warmup_frac)
        return self.lam if warm == 0 else self.lam * min(1.0, (self.step_count + 1) / warm)

    def controlling(self) -> bool:
        return (self.cfg.l0_target is not None
                and self.step_count < int(self.cfg.total_steps * self.cfg.control_frac))

    # -- one step -------------------------------------------------------------------------
    def step(self, x: torch.Tensor) -> dict[str, float] | None:
        """Train on one batch; returns a metrics row on logging steps, else None."""
        if self.done:
            raise RuntimeError("training is already done; check Trainer.done before stepping")
        x = self._prepare(x)
        lam = self.current_lam()
        for group in self.opt.param_groups:
            group["lr"] = self.current_lr()
        x_hat, f = self.sae(x)
        recon = (x_hat - x).pow(2).sum(dim=-1).mean()
        pen = penalty_per_token(self.cfg.penalty.name, f, self.cfg.penalty.params,
                                self.cfg.penalty.grad_floor).mean()
        loss = recon + lam * pen
        if not torch.isfinite(loss):
            return self._diverge(f"loss became {loss.item()} at step {self.step_count}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grad_()
        self.opt.step()
        self.sae.normalize_decoder_()
        self.step_count += 1
        self.tokens += x.shape[0]
        batch_l0 = (f > 0).float().sum(dim=-1).mean().item()
        self._track_firing(f)
        if self.controlling():
            self._control(batch_l0)
        if self.step_count % self.cfg.log_every == 0 or self.done:
            if not all(torch.isfinite(p).all() for p in self.sae.parameters()):
                return self._diverge(f"weights became non-finite by step {self.step_count}")
            row = self._metrics_row(x, x_hat.detach(), f.detach(), loss, recon, pen, lam)
            self.history.append(row)
            return row
        return None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.cfg.sae.d_in:
            raise ValueError(f"activation batch has shape {tuple(x.shape)}; expected "
                             f"[batch, d_in={self.cfg.sae.d_in}]")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).any(dim=1).sum())
            raise NonFiniteActivationsError(
                f"activation batch at step {self.step_count} has NaN/inf in {bad} of "
                f"{x.shape[0]} rows; rebuild the activation cache or check the model")
        if self.scale is None:
            self.scale = math.sqrt(self.cfg.sae.d_in / x.pow(2).sum(dim=-1).mean().item())
        return x * self.scale

    def _track_firing(self, f: torch.Tensor) -> None:
        fired = (f > 0).any(dim=0)
        self.last_fired[fired] = float(self.tokens)

    def dead_fraction(self) -> float:
        horizon = max(self.tokens - self.cfg.dead_window_tokens, 0)
        return (self.last_fired < horizon).float().mean().item() if self.tokens else 0.0

    def _control(self, batch_l0: float) -> None:
        """Integral control in log space; the error is clipped to +-1 so a far-off start
        (a fresh SAE fires half its features) cannot wind lambda up faster than L0 follows."""
        error = math.log(max(batch_l0, 0.5) / self.cfg.l0_target)
        error = max(-1.0, min(1.0, error))
        self.lam = max(self.lam, 1e-12) * math.exp(self.cfg.control_gain * error)

    def _metrics_row(self, x, x_hat, f, loss, recon, pen, lam) -> dict[str, float]:
        raw_x, raw_hat = x / self.scale, x_hat / self.scale
        row = metrics.reconstruction_metrics(raw_x, raw_hat, f)
        row.update(loss=loss.item(), recon_loss=recon.item(), penalty_loss=pen.item(), lam=lam,
                   lr=self.current_lr(), dead_fraction=self.dead_fraction(),
                   step=self.step_count, tokens_seen=self.tokens)
        return row

    def _diverge(self, reason: str) -> None:
        self.status, self.reason = DIVERGED, reason
        return

    # -- end and checkpoints --------------------------------------------------------------
    def result(self) -> TrainResult:
        """The trained SAE with the input scale folded in, and how training ended."""
        status = self.status or (FINISHED if self.step_count >= self.cfg.total_steps
                                 else DATA_EXHAUSTED)
        reason = self.reason
        if status == DATA_EXHAUSTED:
            reason = (f"activations ran out after {self.tokens} of {self.cfg.total_tokens} "
                      f"tokens; give a longer activation stream or fewer total_tokens")
        sae = copy.deepcopy(self.sae).cpu()
        if status != DIVERGED:
            sae.fold_input_scale_(self.scale or 1.0)
        return TrainResult(sae, status, self.step_count, self.tokens, self.lam,
                           self.scale or 1.0, list(self.history), reason)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "sae": self.sae.state_dict(),
                "optimizer": self.opt.state_dict(), "step_count": self.step_count,
                "tokens": self.tokens, "lam": self.lam, "scale": self.scale,
                "last_fired": self.last_fired, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"]["sae"] != self.cfg.to_dict()["sae"]:
            raise CheckpointError(f"checkpoint is for SAE {state['config']['sae']}, "
                                  f"not {self.cfg.to_dict()['sae']}; start a fresh trial")
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        self.step_count, self.tokens = int(state["step_count"]), int(state["tokens"])
        self.lam, self.scale = float(state["lam"]), state["scale"]
        self.last_fired = state["last_fired"].to(self.device)
        self.history = list(state["history"])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: TrainConfig | None = None) -> Trainer:
        """Rebuild a trainer from ``to_bytes`` output; never unpickles arbitrary objects."""
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises several types for truncated/unsafe files
            raise CheckpointError(f"trainer checkpoint is unreadable or unsafe ({exc}); "
                                  f"delete it to restart the trial from scratch") from None
        trainer = cls(cfg or TrainConfig.from_dict(state["config"]))
        trainer.load_state_dict(state)
        return trainer


def train_sae(
    cfg: TrainConfig,
    batches: Iterable[torch.Tensor],
    *,
    trainer: Trainer | None = None,
    on_log: Callable[[dict[str, float], Trainer], None] | None = None,
) -> TrainResult:
    """Train until ``cfg.total_tokens`` or divergence; ``on_log`` sees every metrics row."""
    return drive(trainer or Trainer(cfg), batches, on_log)


def drive(trainer, batches: Iterable[torch.Tensor], on_log=None):
    """The training loop of any trainer with ``done``, ``step`` and ``result`` (a single SAE
    or a ladder ensemble): step until done, hand every logged row(s) to ``on_log``."""
    for x in batches:
        if trainer.done:
            break
        logged = trainer.step(x)
        if logged is not None and on_log is not None:
            on_log(logged, trainer)
    return trainer.result()
