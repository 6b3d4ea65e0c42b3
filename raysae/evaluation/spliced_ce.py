"""Spliced CE of SAEs on held-out token blocks, with the pre-hook work done once.

CE convention: mean next-token cross-entropy (nats) over every predicted position of every
block (targets are tokens 1..ctx-1: ctx-1 predictions per block, BOS never a target), over
the same positions for ce_clean, ce_sae and ce_zero. Per-block CE (``ce_clean_blocks``, the
``ce_sae_blocks`` of ``evaluate``) is the same mean over one block's ctx-1 predictions, in
block order; every block has the same number of predictions, so the overall CE is the plain
mean of the per-block values (``raysae.analysis.confidence`` uses them for the held-out
set's sampling noise). With ``keep_first=True`` (default) the
hooked activation is replaced at every position except the first of each block: position 0
holds BOS, whose activation is an outlier the SAE never trained on (activation harvesting
drops BOS rows). ce_zero zeroes the same positions ce_sae replaces. Reconstruction metrics
(``raysae.core.metrics``) are over the replaced positions.

Work reuse: the constructor runs the model once over the blocks (the clean forward: ce_clean
and the cached hook activation). ``evaluate`` (and ce_zero) then run only the layers after
the hook on the patched activation: the HF model runs itself with its layer list cut to the
layers after the hook (``inputs_embeds`` = patched residual), checked at construction to
reproduce the clean logits. Hooks other than a block's resid_pre/resid_post, or a failed
check, fall back to a full forward with a replacing hook (same numbers, slower).

Device work: the blocks, their cached activations and everything computed per batch stay on
the model's / SAE's device. Per-block CE sums and the reconstruction sums (one per per-token
function of the metrics table, ``raysae.core.metrics.token_sums``) add up as device tensors
and reach the host in one read per evaluation: a host read per batch (``.item()``,
``.cpu()``, a blocking copy) waits for the device to finish that batch, so the accelerator
would idle once per batch.
fvu's denominator (the spread of x about its mean) does not depend on the SAE: it is computed
once, at construction.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysae.core import metrics
from raysae.evaluation import feature_stats
from raysae.lm import corpus
from raysae.lm.models import check_hook
from raysae.settings import UserError

Transform = Callable[[torch.Tensor], torch.Tensor]
_RESID = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_in|hook_resid_post|hook_out)$")
_CHECK_TOL = 1e-4


def next_token_ce_blocks(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-block sum of next-token CE over positions 0..ctx-2 (logits [b, ctx, V], tokens
    [b, ctx]): float64 [b] on the logits' device."""
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(),
                         tokens[:, 1:].reshape(-1).to(logits.device), reduction="none")
    return ce.view(tokens.shape[0], -1).sum(1).double()


def _to_host(*parts: torch.Tensor) -> np.ndarray:
    """Tensors flattened into one float64 array: one copy to the host (after gathering them
    on the first one's device)."""
    device = parts[0].device
    return torch.cat([p.reshape(-1).to(device, torch.float64) for p in parts]).cpu().numpy()


def ce_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(ce_zero - ce_sae) / (ce_zero - ce_clean); NaN when zero-ablation costs nothing."""
    gap = ce_zero - ce_clean
    return float("nan") if abs(gap) < 1e-12 else (ce_zero - ce_sae) / gap


class _Suffix:
    """The HF model's layers from ``start`` on, final norm and unembedding, fed a residual."""

    def __init__(self, model, start: int):
        hf = model.original_model
        self.base = getattr(hf, hf.base_model_prefix)
        self.head = hf.get_output_embeddings()
        if not isinstance(getattr(self.base, "layers", None), nn.ModuleList):
            raise TypeError(f"{type(self.base).__name__} has no `layers` list to cut")
        self.start = start

    def __call__(self, resid: torch.Tensor) -> torch.Tensor:
        full = self.base.layers
        self.base.layers = nn.ModuleList(list(full)[self.start:])
        try:
            hidden = self.base(inputs_embeds=resid).last_hidden_state
        finally:
            self.base.layers = full
        return self.head(hidden)


def _to_tokens(tokens) -> torch.Tensor:
    tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected [n_blocks >= 1, "
                         f"ctx >= 2] token ids")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens has dtype {tokens.dtype}; pass integer token ids")
    return tokens.long().cpu()


class Evaluator:
    """Held-out blocks with their clean forward done: ``evaluate(sae, transform)`` is cheap."""

    def __init__(self, model, hook_name: str, tokens, batch_size: int = 8,
                 keep_first: bool = True, resume: bool = True):
        check_hook(model, hook_name)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.hook_name = model, hook_name
        self.tokens = _to_tokens(tokens)
        vocab = model.original_model.get_output_embeddings().weight.shape[0]
        if int(self.tokens.max()) >= vocab or int(self.tokens.min()) < 0:
            raise ValueError(f"token ids span [{int(self.tokens.min())}, "
                             f"{int(self.tokens.max())}] but the model's vocabulary is "
                             f"{vocab}; tokenize with this model's tokenizer")
        self.first = int(keep_first)
        self.device = next(model.parameters()).device
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        clean, first_logits = [], None
        for toks in self.tokens.to(self.device).split(batch_size):  # one copy, not per batch
            logits, acts = self._clean_forward(toks)
            clean.append(next_token_ce_blocks(logits, toks))
            self._batches.append((toks, acts.detach()))
            first_logits = logits if first_logits is None else first_logits
        self.n_predictions = self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        clean_sums = _to_host(*clean)
        self.ce_clean = float(clean_sums.sum()) / self.n_predictions
        #: Clean CE of each held-out block (mean over its ctx-1 predictions), block order.
        self.ce_clean_blocks: list[float] = self._block_means(clean_sums)
        self.d_in = self._batches[0][1].shape[-1]
        self._spread = self._total_spread()
        self._suffix = self._make_suffix(first_logits) if resume else None
        del first_logits
        self.ce_zero = self.ce_with(torch.zeros_like)

    def _block_means(self, sums: np.ndarray) -> list[float]:
        """Per-block CE sums -> per-block mean CE (every block has ctx-1 predictions)."""
        return (sums / (self.tokens.shape[1] - 1)).tolist()

    def _replaced(self, acts: torch.Tensor) -> torch.Tensor:
        """A batch's activations at the replaced positions, [tokens, d_in]."""
        return acts[:, self.first:].reshape(-1, self.d_in)

    def _total_spread(self) -> torch.Tensor:
        """sum ||x - mean(x)||^2 over the replaced positions (fvu's denominator in
        ``raysae.core.metrics``), a float64 device scalar: two passes over the batches, x
        never concatenated."""
        xs = [self._replaced(acts) for _, acts in self._batches]
        mean = sum(x.double().sum(dim=0) for x in xs) / self.n_tokens
        return sum((x.double() - mean).pow(2).sum() for x in xs)

    @property
    def n_tokens(self) -> int:
        """Replaced positions (the tokens reconstruction metrics are over)."""
        return self.tokens.shape[0] * (self.tokens.shape[1] - self.first)

    @property
    def resumes(self) -> bool:
        """True when evaluations run only the layers after the hook."""
        return self._suffix is not None

    @torch.no_grad()
    def _clean_forward(self, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cache = self.model.run_with_cache(toks, names_filter=self.hook_name,
                                                  return_cache_object=False)
        acts = cache[self.hook_name] if self.hook_name in cache else next(iter(cache.values()))
        return logits, acts

    def _make_suffix(self, want: torch.Tensor) -> _Suffix | None:
        """Resume after the hook when that reproduces the clean logits ``want`` of the first
        batch; else None (fallback)."""
        match = _RESID.match(self.hook_name)
        if match is None:
            return None
        start = int(match.group(1)) + (match.group(2) in ("hook_resid_post", "hook_out"))
        try:
            suffix = _Suffix(self.model, start)
            with torch.no_grad():
                got = suffix(self._batches[0][1])
            err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        except (TypeError, AttributeError, ValueError, RuntimeError) as exc:
            err, reason = float("inf"), f"{type(exc).__name__}: {exc}"
        else:
            reason = f"relative logit error {err:.2e}"
        if err <= _CHECK_TOL:
            return suffix
        warnings.warn(f"cannot resume the forward after {self.hook_name} ({reason}); "
                      f"falling back to full forwards with a replacing hook", stacklevel=3)
        return None

    @torch.no_grad()
    def _logits(self, toks: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        if self._suffix is not None:
            return self._suffix(patched)
        return self.full_forward_logits(toks, patched)

    @torch.no_grad()
    def full_forward_logits(self, toks: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        """Logits of a full forward whose hooked activation is replaced by ``patched``."""
        def replace(act, hook):
            return patched.to(act.dtype)

        return self.model.run_with_hooks(toks, fwd_hooks=[(self.hook_name, replace)],
                                         return_type="logits")

    def _patch(self, acts: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        patched = acts.clone()
        patched[:, self.first:] = new.reshape(patched[:, self.first:].shape).to(acts.dtype)
        return patched

    @torch.no_grad()
    def ce_with(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """CE with the replaced positions' activations [b, pos, d] mapped through ``replace``."""
        sums = []
        for toks, acts in self._batches:
            patched = self._patch(acts, replace(acts[:, self.first:]))
            sums.append(next_token_ce_blocks(self._logits(toks, patched), toks))
        return float(_to_host(*sums).sum()) / self.n_predictions

    def activations(self, device: str | torch.device | None = "cpu") -> torch.Tensor:
        """The cached activations at the replaced positions, [n_tokens, d_in] float32, on
        ``device`` (None: where they are cached, the model's device)."""
        x = torch.cat([self._replaced(a).float() for _, a in self._batches])
        return x if device is None else x.to(device)

    @staticmethod
    def metric_names() -> tuple[str, ...]:
        """The scalar metrics ``evaluate`` returns (names of the metrics table)."""
        return ("ce_clean", "ce_sae", "ce_zero", "ce_recovered",
                *metrics.reconstruction_names())

    @torch.no_grad()
    def evaluate(self, sae, transform: Transform | None = None) -> dict[str, float | list[float]]:
        """CE and the metrics table's reconstruction metrics with the hook replaced by the
        SAE's reconstruction.

        ``transform`` maps feature activations [tokens, d_sae] before decoding (ablations).
        Every value is a float except ``ce_sae_blocks``: the CE of each held-out block (block
        order), whose plain mean is ``ce_sae``.
        """
        if sae.cfg.d_in != self.d_in:
            raise UserError(f"SAE reads d_in={sae.cfg.d_in} but {self.hook_name} has width "
                             f"{self.d_in}; use an SAE trained on this hook")
        sae_device = sae.W_enc.device
        sums, recon = [], 0  # recon: the table's per-token sums (a device tensor)
        for toks, acts in self._batches:
            x = self._replaced(acts).to(sae_device, torch.float32)
            f = sae.encode(x)
            if transform is not None:
                f = transform(f)
            x_hat = sae.decode(f)
            recon = recon + metrics.token_sums(x, x_hat, f)
            sums.append(next_token_ce_blocks(self._logits(toks, self._patch(acts, x_hat)), toks))
        host = _to_host(*sums, recon, self._spread)  # the one read of this evaluation
        k = len(recon) + 1
        block_sums, recon_sums, spread = host[:-k], host[-k:-1].tolist(), float(host[-1])
        ce_sae = float(block_sums.sum()) / self.n_predictions
        return {"ce_clean": self.ce_clean, "ce_sae": ce_sae,
                "ce_sae_blocks": self._block_means(block_sums), "ce_zero": self.ce_zero,
                "ce_recovered": ce_recovered(self.ce_clean, ce_sae, self.ce_zero),
                **metrics.from_sums(recon_sums, self.n_tokens, self.d_in, spread)}


def unproduced_metrics() -> list[str]:
    """Registered metrics (raysae.core.metrics) that neither the evaluator nor the feature
    statistics produce: a search would end without them, so the job refuses to start."""
    produced = {*Evaluator.metric_names(), *feature_stats.SUMMARY_COLUMNS}
    return [name for name in metrics.metric_names() if name not in produced]


def heldout_evaluator(model, hook_name: str, n_blocks: int = 64, context_length: int = 128,
                      source=corpus.STDLIB, batch_size: int = 8, **kwargs) -> Evaluator:
    """An Evaluator on the held-out split of ``source`` (never used for training)."""
    blocks = corpus.heldout_blocks(model, context_length, max_blocks=n_blocks, source=source)
    return Evaluator(model, hook_name, blocks, batch_size=batch_size, **kwargs)


def evaluate_sae(evaluator: Evaluator, sae,
                 n_tokens: int = feature_stats.DEFAULT_TOKENS) -> dict[str, float]:
    """Everything a trial reports: spliced CE, reconstruction and feature-statistic summary.

    Feature statistics use the evaluator's held-out activations (at most ``n_tokens``).
    """
    out = evaluator.evaluate(sae)
    summary = feature_stats.summarize(*feature_stats.feature_statistics(evaluator, sae, n_tokens))
    out.update({k: summary[k] for k in feature_stats.SUMMARY_COLUMNS})
    return out


def feature_statistics(evaluator_or_acts, sae, n_tokens: int = feature_stats.DEFAULT_TOKENS):
    """(per_feature_df, activation_sample_df); see ``raysae.evaluation.feature_stats``."""
    return feature_stats.feature_statistics(evaluator_or_acts, sae, n_tokens)

