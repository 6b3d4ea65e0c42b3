"""An L0 ladder of K SAEs trained together: one batch read once, fed to K members.
Words: the *ladder* is the K SAEs trained together, a *member* one of them (one SAE: K = 1).

``LadderSAE`` holds K SAEs as stacked weights (``W_enc [K, d_in, d_sae]``, ``W_dec
[K, d_sae, d_in]``, ``b_enc [K, d_sae]``, ``b_dec [K, d_in]``, plus the kind's state) and
runs them with batched matmuls. ``LadderTrainer`` trains one member per target L0, all of
kind ``cfg.kind`` (raysae.core.kinds), each with its own lambda and controller (penalty
kinds) or k (TopK, BatchTopK), dead-feature tracking and divergence status. The loss is the
sum over live members of ``mean_tokens ||x_hat_k - x||^2 + term_k`` (lambda_k * penalty, or
AuxK): each member's gradient is what it would be alone, and Adam is elementwise, so one
Adam over the stacked weights trains every member as it would be trained alone.

No host sync between logging steps: L0, controller, lambdas, thresholds, finiteness and
last-fired steps stay on the device; ``.item()``/``.tolist()`` run every ``cfg.log_every``
steps, at the end, in ``result()`` and once on the first batch (the activation scale). A
member whose loss goes NaN/inf gets zero gradients from that step on and is *reported*
diverged (its Adam state zeroed) at the next logging step; a non-finite batch trains nobody
and raises ``NonFiniteActivationsError`` there. The loop over batches: raysae.core.training.

The arithmetic of a step: bf16 autocast and TF32 matmuls, on by default on CUDA. An Ampere
or Hopper GPU multiplies fp32 matrices at a fraction of its TF32 and bf16
throughput (H100: 67 TFLOP/s fp32, 495 TF32, 990 bf16, dense), so a trial that left both
off would use an eighth of the chip. The master weights, Adam's state, the penalty and the
loss stay fp32 (raysae.core.penalties turns autocast off around the penalty). Evaluation
never runs under these settings: the spliced CE of every trial is computed at full fp32, so
CE stays comparable between trials trained with and without them.

Which step a ladder takes (dense batched matmuls, the relu sparse step of
raysae.core.sparse_step, or the fixed-k decoder of raysae.core.fixed_k) is decided by
``sparse_step_now`` from ``TrainConfig.sparse_step``, the kind, the device and the measured
break-even points.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from raysae.core import metrics
from raysae.core.config import TrainConfig, check_targets
from raysae.core.fixed_k import FixedKFeatures, fixed_k_decode
from raysae.core.kinds import StepContext, get_kind
from raysae.core.ladder_sae import LadderSAE
from raysae.core.outcome import (
    DATA_EXHAUSTED,
    DIVERGED,
    FINISHED,
    CheckpointError,
    NonFiniteActivationsError,
    TrainResult,
)
from raysae.core.penalties import penalty_scale_at_one
from raysae.core.recipes import UNIT_NORM, get_recipe
from raysae.core.sparse_step import ActiveFeatures, active_forward
from raysae.core.transfer import to_compute

SPARSE_STEP_MAX_DENSITY = 1 / 10
"""``sparse_step = "auto"`` uses the sparse step after a logging step whose members' mean L0
is at most this fraction of d_sae (its cost follows the active entries of all members;
above about this density the dense step is faster on a CPU: benchmarks/train_throughput.py
measures the ratio at several densities)."""

FIXED_K_AUTO = False
"""Whether ``sparse_step = "auto"`` picks the fixed-k decoder for TopK and BatchTopK (at most
``SPARSE_STEP_MAX_DENSITY`` of d_sae per token). Off: it was slower than the dense decoder
wherever benchmarks/gpu_check.py measured it, on a CPU and on a GPU (embedding_bag's
backward sorts the indices)."""


def sparse_step_now(trainer) -> bool:
    """Whether this step uses a sparse step (``TrainConfig.sparse_step``): for fixed-k
    kinds the fixed-k decoder, only when asked ("on": no sync, but measured slower than
    the dense decoder on CPU and on an H200, see ``FIXED_K_AUTO``), for relu kinds the
    relu sparse step ("auto": on CPU, after a logging step with a low L0)."""
    mode = trainer.cfg.sparse_step
    if mode == "off":
        return False
    if trainer.kind.fixed_k:
        return mode == "on" or (FIXED_K_AUTO and trainer.kind.fixed_k_l0(trainer.model)
                                <= SPARSE_STEP_MAX_DENSITY * trainer.cfg.sae.d_sae)
    if not trainer.kind.sparse_step:
        return False
    return mode == "on" or (trainer.device.type == "cpu" and trainer.sparse_auto)


def uses_bf16(mode: str, device: torch.device) -> bool:
    """Whether a step on ``device`` runs its dense matmuls under bf16 autocast
    (``TrainConfig.autocast_bf16``: 'auto' on CUDA only, 'on' everywhere, 'off' never)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA matmuls (and cuDNN convolutions) may use TF32 inside the block; the previous
    setting comes back after it, so evaluation in the same process stays full fp32."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


class LadderTrainer:
    """The ladder: one member per target L0, trained together on the same batches (module doc).
    ``lams`` overrides the start lambdas (default ``cfg.lam / rho(1)``; fixed when
    ``cfg.control_frac = 0``); kinds without a penalty keep lambda at 0."""

    def __init__(self, cfg: TrainConfig, targets: Sequence[float], *,
                 lams: Sequence[float] | None = None):
        if cfg.sae is None:
            raise ValueError("TrainConfig.sae is None: give the SAE's shape (SAEConfig)")
        self.cfg, self.targets = cfg, [float(t) for t in targets]
        self.k, self.kind = len(self.targets), get_kind(cfg.kind)
        check_targets(self.targets, cfg.sae.d_sae)
        rho1 = penalty_scale_at_one(cfg.penalty.name, cfg.penalty.params)
        start = [cfg.lam / rho1] * self.k if lams is None else [float(v) for v in lams]
        if len(start) != self.k:
            raise ValueError(f"lams has {len(start)} values for {self.k} targets")
        start = [v * self.kind.uses_lambda for v in start]  # 0 for kinds without lambda
        dev = self.device = torch.device(cfg.device)
        self.recipe = get_recipe(cfg.recipe if self.kind.uses_penalty else UNIT_NORM)
        self.options = self.kind.options(cfg.kind_options.get(cfg.kind))
        self.model = LadderSAE(cfg.sae, [cfg.seed] * self.k, kind=cfg.kind,
                               targets=self.targets, recipe=self.recipe,
                               options=self.options).to(dev)
        fused = dev.type in ("cpu", "cuda") or None  # fused Adam: no .item() per step
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                    fused=fused)
        self.lam = torch.tensor(start, dtype=torch.float64, device=dev)
        self.target_t = torch.tensor(self.targets, dtype=torch.float64, device=dev)
        self.live = torch.ones(self.k, dtype=torch.bool, device=dev)
        self.died_at = torch.full((self.k,), -1, dtype=torch.int64, device=dev)
        self.bad_rows = torch.zeros((), dtype=torch.int64, device=dev)
        self.last_fired = torch.full((self.k, cfg.sae.d_sae), -1.0, dtype=torch.float64, device=dev)
        self.step_count = self.tokens = 0
        self._dead_before = torch.zeros((), dtype=torch.float64, device=dev)
        self.scale: float | None = cfg.activation_scale if cfg.normalize_activations else 1.0
        self.controlled = self.kind.uses_controller and cfg.control_frac > 0
        self._bf16 = uses_bf16(cfg.autocast_bf16, dev)
        self._compiled, self.compile_seconds = None, 0.0
        self.sparse_auto = False  # set on logging steps from the members' L0
        self.status: list[str | None] = [None] * self.k
        self.reason: list[str | None] = [None] * self.k
        self.stopped: list[list[int] | None] = [None] * self.k  # [steps, tokens] at divergence
        self.history: list[list[dict[str, float]]] = [[] for _ in range(self.k)]

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.total_steps or None not in self.status

    def current_lr(self) -> float:
        total, decay = self.cfg.total_steps, int(self.cfg.total_steps * self.cfg.lr_decay_frac)
        left = total - self.step_count
        return self.cfg.lr if decay == 0 or left > decay else self.cfg.lr * left / decay

    def controlling(self) -> bool:
        return (self.controlled
                and self.step_count < int(self.cfg.total_steps * self.cfg.control_frac))

    def current_lam(self, step: int | None = None) -> torch.Tensor:
        """[K] lambdas of (0-based) ``step`` (default: the next): controlled ones as they
        stand, fixed ones (control_frac 0) ramped from 0 over ``lam_warmup_frac``."""
        warm = int(self.cfg.total_steps * self.cfg.lam_warmup_frac)
        if self.controlled or warm == 0:
            return self.lam
        step = self.step_count if step is None else step
        return self.lam * min(1.0, (step + 1) / warm)

    def context(self, step: int | None = None) -> StepContext:
        """What the kind's hooks see of (0-based) ``step`` (default: the next)."""
        step = self.step_count if step is None else step
        return StepContext(cfg=self.cfg, model=self.model, step=step, targets=self.target_t,
                           lam=self.current_lam(step), controlling=self.controlling(),
                           penalty_weighting=self.recipe.penalty_weighting,
                           dead_mask=self.dead_mask,
                           moving=self.kind.moving(self.cfg, self.model.state, step))

    def sparse_now(self) -> bool:
        """Whether this step uses a sparse step (``sparse_step_now``)."""
        return sparse_step_now(self)

    def _forward(self, x: torch.Tensor):
        """(x_hat, f or ActiveFeatures or FixedKFeatures, the kind's LossTerms, fires
        [K, d_sae])."""
        sparse = self.sparse_now()
        if sparse and not self.kind.fixed_k:
            x_hat, active = active_forward(self.model, x)
            terms = self.kind.active_loss_terms(self.context(), active)
            return x_hat, active, terms, active.fires()
        if sparse:  # fixed-k: the kept values by index; pre stays dense (AuxK reads it)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self._bf16):
                pre = self.model.pre_acts(x)
                f = self.kind.activate_fixed(self.model, pre)
                x_hat = fixed_k_decode(self.model, f)
                terms = self.kind.loss_terms(self.context(), x, x_hat, f, pre)
            return x_hat.float(), f, terms, f.fires()
        return self._dense(x, self.context())

    def _dense_forward(self, x: torch.Tensor, ctx: StepContext):
        """The dense step's forward (``_forward``'s), one function so that ``compile``
        compiles it whole, and its backward with it."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self._bf16):
            pre = self.model.pre_acts(x)
            f = self.kind.activate(self.model, pre)
            x_hat = self.model.decode(f)
            terms = self.kind.loss_terms(ctx, x, x_hat, f, pre)
        return x_hat.float(), f, terms, torch.count_nonzero(f.detach(), dim=1)  # one pass

    def _dense(self, x: torch.Tensor, ctx: StepContext):
        """``_dense_forward``, compiled on first use when ``TrainConfig.compile`` says so;
        the first call's seconds (the compilation) are kept in ``compile_seconds``."""
        if self.cfg.compile == "off":
            return self._dense_forward(x, ctx)
        if self._compiled is None:
            self._compiled = torch.compile(self._dense_forward, dynamic=False)
            start = time.perf_counter()
            out = self._compiled(x, ctx)
            self.compile_seconds = time.perf_counter() - start
            return out
        return self._compiled(x, ctx)

    def step(self, x: torch.Tensor) -> list[dict[str, float]] | None:
        """Train every live member on one batch; per-member rows on logging steps, else None.
        CUDA matmuls of the step (forward and backward) may use TF32 (``TrainConfig.tf32``)."""
        if self.done:
            raise RuntimeError("training is already done; check LadderTrainer.done first")
        with tf32_matmuls(self.cfg.tf32):
            return self._step(x)

    def _step(self, x: torch.Tensor) -> list[dict[str, float]] | None:
        x, x_ok = self._prepare(x)
        for group in self.opt.param_groups:
            group["lr"] = self.current_lr()
        x_hat, f, terms, fires = self._forward(x)
        recon = (x_hat - x).pow(2).sum(dim=-1).mean(dim=-1)
        per = recon + sum(terms.terms.values()).float() if terms.terms else recon
        finite = torch.isfinite(per)
        train = self.live & finite & x_ok
        self.opt.zero_grad(set_to_none=True)
        torch.where(train, per, 0.0).sum().backward()
        grads, untrained = [p.grad for p in self.model.parameters()], ~train
        for g in grads:  # NaN-safe: a member that did not train gets zero gradients
            g.masked_fill_(untrained.view(-1, *[1] * (g.ndim - 1)), 0.0)
        self.model.remove_parallel_grad_()
        if self.recipe.grad_clip is not None:
            self._clip_grads(grads, self.recipe.grad_clip)
        self.opt.step()
        self.model.normalize_decoder_()
        self.kind.after_step(self.model, train)
        self.step_count += 1
        self.tokens += x.shape[0]
        self._move_dead_window()
        newly = self.live & ~finite & x_ok
        self.died_at.masked_fill_(newly, self.step_count - 1)
        self.live &= ~newly
        self.last_fired.masked_fill_(fires > 0, float(self.tokens))
        if self.controlling():
            self._control(fires.sum(dim=-1) / x.shape[0])
        if self.step_count % self.cfg.log_every == 0 or self.done:
            sparse = isinstance(f, ActiveFeatures | FixedKFeatures)
            f = (f.dense() if sparse else f.detach()).float()
            return self._log(x, x_hat.detach(), f, per.detach(), recon, terms)
        return None

    @staticmethod
    @torch.no_grad()
    def _clip_grads(grads: list[torch.Tensor], max_norm: float) -> None:
        """Clip each member's gradient norm over all its weights to ``max_norm`` (as
        ``clip_grad_norm_`` on that SAE alone), on the device: one norm per tensor, one
        multiplication for all of them."""
        per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        factor = (max_norm / (torch.linalg.vector_norm(per_tensor, dim=0) + 1e-6)).clamp_max(1.0)
        torch._foreach_mul_(grads, [factor.view(-1, *[1] * (g.ndim - 1)) for g in grads])

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_compute(x, self.device)  # the copy (non_blocking), then the conversion
        if x.ndim != 2 or x.shape[1] != self.cfg.sae.d_in:
            raise ValueError(f"activation batch has shape {tuple(x.shape)}; expected "
                             f"[batch, d_in={self.cfg.sae.d_in}]")
        bad = (~torch.isfinite(x).all(dim=1)).sum()
        x_ok = bad == 0
        if self.scale is None:  # the one sync outside logging steps: the first batch
            if not x_ok:
                raise NonFiniteActivationsError(
                    f"the first activation batch has NaN/inf in {int(bad)} of {x.shape[0]} "
                    "rows; rebuild the activation cache or check the model")
            self.scale = math.sqrt(self.cfg.sae.d_in / x.pow(2).sum(dim=-1).mean().item())
        self.bad_rows += bad
        return torch.where(x_ok, x, 0.0) * self.scale, x_ok

    def _control(self, batch_l0: torch.Tensor) -> None:
        """Per-member integral control of ln(lambda), error clipped to +-1 ."""
        error = self.kind.lambda_error(self.context(), batch_l0).clamp(-1.0, 1.0)
        new = self.lam.clamp_min(1e-12) * torch.exp(self.cfg.control_gain * error)
        self.lam = torch.where(self.live, new, self.lam)

    def dead_mask(self) -> torch.Tensor:
        """[K, d_sae]: no fire in the last ``dead_window_tokens`` (or ever, if fewer). The
        window's start is a device tensor, so a compiled step does not recompile for it."""
        return self.last_fired < self._dead_before

    def _move_dead_window(self) -> None:
        self._dead_before.fill_(max(self.tokens - self.cfg.dead_window_tokens, 0))

    def dead_fractions(self) -> torch.Tensor:
        return self.dead_mask().float().mean(dim=1) * bool(self.tokens)

    def check_members(self) -> None:
        """Sync: raise on a bad batch seen since the last check; mark non-finite members."""
        if bad := int(self.bad_rows):
            raise NonFiniteActivationsError(
                f"activation batches before step {self.step_count} had NaN/inf in {bad} rows "
                f"(they trained nobody); rebuild the activation cache or check the model")
        self.live &= self.model.finite_members()
        died = self.died_at.tolist()
        for k, ok in enumerate(self.live.tolist()):
            if ok or self.status[k] is not None:
                continue
            when = (f"loss became non-finite at step {died[k]}" if died[k] >= 0
                    else f"weights became non-finite by step {self.step_count}")
            self.status[k], self.reason[k] = DIVERGED, when
            self.stopped[k] = [self.step_count, self.tokens]
            for state in self.opt.state.values():  # zero Adam's moments: no further updates
                for moment in ("exp_avg", "exp_avg_sq"):
                    state[moment][k].zero_()

    def _log(self, x, x_hat, f, per, recon, terms) -> list[dict[str, float]]:
        self.check_members()
        raw_x = x / self.scale
        losses, recons, pens = per.tolist(), recon.tolist(), terms.penalty.detach().tolist()
        named = {f"{name}_loss": term.detach().tolist() for name, term in terms.terms.items()}
        lams, dead = self.current_lam(self.step_count - 1).tolist(), self.dead_fractions().tolist()
        extra, rows = self.kind.log_fields(self.context(self.step_count - 1)), []
        for k in range(self.k):
            if self.status[k] is not None:
                continue
            row = metrics.reconstruction_metrics(raw_x, x_hat[k] / self.scale, f[k])
            row.update(loss=losses[k], recon_loss=recons[k], penalty_loss=pens[k], lam=lams[k],
                       lr=self.current_lr(), dead_fraction=dead[k], step=self.step_count,
                       tokens_seen=self.tokens, member=k, target_l0=self.targets[k],
                       **{name: values[k] for name, values in named.items()}, **extra[k])
            self.history[k].append(row)
            rows.append(row)
        mean_l0 = sum(row["l0"] for row in rows) / max(len(rows), 1)
        self.sparse_auto = bool(rows) and mean_l0 <= SPARSE_STEP_MAX_DENSITY * self.cfg.sae.d_sae
        return rows

    def result(self) -> list[TrainResult]:
        """Per member: its SAE (scale folded in unless diverged) and how it ended."""
        self.check_members()
        lams, out = self.lam.tolist(), []
        for k in range(self.k):
            status = self.status[k] or (FINISHED if self.step_count >= self.cfg.total_steps
                                        else DATA_EXHAUSTED)
            reason = self.reason[k]
            if status == DATA_EXHAUSTED:
                reason = (f"activations ran out after {self.tokens} of {self.cfg.total_tokens} "
                          f"tokens; give a longer activation stream or fewer total_tokens")
            sae = self.model.member(k)
            if status != DIVERGED:
                sae.fold_input_scale_(self.scale or 1.0)
            steps, tokens = self.stopped[k] or (self.step_count, self.tokens)
            out.append(TrainResult(sae, status, steps, tokens, lams[k], self.scale or 1.0,
                                   list(self.history[k]), reason))
        return out

    _STATE = ("step_count", "tokens", "scale", "lam", "live", "died_at", "bad_rows",
              "last_fired", "status", "reason", "stopped", "history", "sparse_auto")

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._STATE}
        state.update(config=self.cfg.to_dict(), targets=list(self.targets),
                     model=self.model.state_dict(), optimizer=self.opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.cfg.to_dict()["sae"], self.cfg.kind, self.targets)
        theirs = (state["config"]["sae"], state["config"].get("kind", "relu"), state["targets"])
        if theirs != mine:
            raise CheckpointError(f"checkpoint is for (SAE, kind, targets) {theirs}, not "
                                  f"{mine}; start a fresh trial")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        for name in self._STATE:  # sparse_auto: absent from older checkpoints
            value = state.get(name, getattr(self, name))
            setattr(self, name, value.to(self.device) if torch.is_tensor(value) else value)
        self._move_dead_window()

    def to_bytes(self) -> bytes:
        torch.save(self.state_dict(), buf := io.BytesIO())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, cfg: TrainConfig | None = None,
                   targets: Sequence[float] | None = None) -> LadderTrainer:
        """Rebuild from ``to_bytes`` output; never unpickles arbitrary objects."""
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            cfg = cfg or TrainConfig.from_dict(state["config"])
            trainer = cls(cfg, targets if targets is not None else state["targets"])
            trainer.load_state_dict(state)
        except CheckpointError:
            raise
        except Exception as exc:  # torch raises several types for truncated/unsafe files
            raise CheckpointError(f"ladder checkpoint is unreadable or unsafe ({exc}); "
                                  f"delete it to restart the trial from scratch") from None
        return trainer

