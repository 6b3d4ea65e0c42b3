"""Feature statistics of an SAE over many tokens (the study used 100k), as DataFrames.

- ``per_feature`` (one row per feature): feature, frequency (fraction of tokens it fires on),
  fires (count), max_activation, median_nonzero (median of its nonzero activations; NaN when
  it never fired), log10_frequency (NaN when dead).
- ``activation_sample``: every nonzero activation of the first 4000 tokens (the study's
  activation histogram): token, feature, activation.

Counts (dead, < 1e-5) and medians reuse ``raysae.core.metrics``. Per-feature medians and
quantiles come from ``NonzeroIndex``: the nonzero activations grouped by feature and sorted,
so nothing of size [tokens, d_sae] is ever held (nonzeros are ~L0 per token).

Device work: features are computed, counted and collected on the SAE's device (an
Evaluator's activations never leave it) and reach the host once, at the end: a host read per
chunk would make the accelerator wait for that chunk. What remains per chunk is the
compaction of its nonzeros (``nonzero`` must learn its output size, which waits for the
chunk on an accelerator); the ``max_nonzero`` cap reuses that size instead of reading a
count of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysae import io
from raysae.core import metrics
from raysae.settings import UserError

DEFAULT_TOKENS = 100_000
SAMPLE_TOKENS = 4000
MAX_NONZERO = 50_000_000  # stop collecting values for medians/quantiles past this (~400 MB)
_CHUNK = 4096


class NonzeroIndex:
    """Nonzero activations grouped by feature (CSR: ``values[offsets[i]:offsets[i+1]]``, sorted)."""

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor, token_l0: torch.Tensor):
        self.values, self.offsets, self.token_l0 = values, offsets, token_l0

    @property
    def n_tokens(self) -> int:
        return len(self.token_l0)

    @property
    def max_token_l0(self) -> int:
        return int(self.token_l0.max()) if len(self.token_l0) else 0

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], d_sae: int,
                     max_nonzero: int | None = None) -> NonzeroIndex:
        """The index of feature activation ``batches`` [tokens, d_sae], built on their device
        and copied to the host once. With ``max_nonzero``, only the first batches holding at
        most that many activations > 0 in all are indexed (the rest are still consumed)."""
        feats, vals, l0s = [], [], []
        nnz, bound, capped = None, 0, False
        for f in batches:
            if capped:
                continue
            tok, feat = f.nonzero(as_tuple=True)
            l0 = (f > 0).sum(dim=-1)
            if max_nonzero is not None:
                nnz = l0.sum() if nnz is None else nnz + l0.sum()
                bound += len(tok)  # >= nnz (every f > 0 is nonzero) and known without a read
                if bound > max_nonzero and int(nnz) > max_nonzero:  # read where it may bite
                    capped = True
                    continue
            feats.append(feat.to(torch.int64))
            vals.append(f[tok, feat].float())
            l0s.append(l0.to(torch.int32))
        if not feats:
            return cls(torch.zeros(0), torch.zeros(d_sae + 1, dtype=torch.int64),
                       torch.zeros(0, dtype=torch.int32))
        feat, val = torch.cat(feats), torch.cat(vals)
        by_value = torch.argsort(val)
        order = by_value[torch.argsort(feat[by_value], stable=True)]
        counts = torch.bincount(feat, minlength=d_sae)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(val[order].cpu(), offsets.cpu(), torch.cat(l0s).cpu())

    def quantile(self, q: float) -> torch.Tensor:
        """Per-feature q-quantile of nonzero values (linear interpolation); NaN if never fired."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q={q} must lie in [0, 1]")
        counts = self.counts
        fired = counts > 0
        pos = q * (counts - 1).clamp_min(0).double()
        lo, hi = pos.floor().long(), pos.ceil().long()
        start = self.offsets[:-1]
        last = max(len(self.values) - 1, 0)
        v = self.values if len(self.values) else torch.zeros(1)
        v_lo = v[(start + lo).clamp(max=last)].double()
        v_hi = v[(start + hi).clamp(max=last)].double()
        out = v_lo + (v_hi - v_lo) * (pos - lo)
        return torch.where(fired, out, torch.full_like(out, float("nan"))).float()


def _as_activation_batches(source, n_tokens: int | None,
                           device: torch.device) -> Iterator[torch.Tensor]:
    """[tokens, d_in] chunks from an Evaluator (its activations moved to ``device`` at most
    once), a tensor ([N, d] or [b, pos, d]) or batches."""
    if hasattr(source, "activations"):
        source = source.activations(device)
    if isinstance(source, np.ndarray):
        source = torch.as_tensor(source)
    if isinstance(source, torch.Tensor):
        source = source.reshape(-1, source.shape[-1]).split(_CHUNK)
    seen = 0
    for x in source:
        x = torch.as_tensor(x)
        x = x.reshape(-1, x.shape[-1])
        if n_tokens is not None:
            x = x[: n_tokens - seen]
        if x.shape[0]:
            seen += x.shape[0]
            yield x
        if n_tokens is not None and seen >= n_tokens:
            return


def feature_batches(source, sae, n_tokens: int | None = DEFAULT_TOKENS) -> Iterator[torch.Tensor]:
    """The SAE's feature activations [chunk, d_sae] over the first ``n_tokens`` of ``source``."""
    if n_tokens is not None and n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens} must be >= 1 (or None for all)")
    device = sae.W_enc.device
    with torch.no_grad():
        for x in _as_activation_batches(source, n_tokens, device):
            if x.shape[-1] != sae.cfg.d_in:
                raise UserError(f"activations have width {x.shape[-1]} but the SAE reads "
                                 f"d_in={sae.cfg.d_in}; use the SAE trained on this hook")
            for chunk in x.split(_CHUNK):
                yield sae.encode(chunk.to(device, torch.float32))


def feature_statistics(source, sae, n_tokens: int | None = DEFAULT_TOKENS,
                       sample_tokens: int = SAMPLE_TOKENS,
                       max_nonzero: int = MAX_NONZERO) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per_feature, activation_sample) DataFrames over the first ``n_tokens`` of ``source``.

    ``source``: an ``Evaluator`` (its held-out activations), a tensor, or an iterable of
    activation batches. ``attrs["n_tokens"]`` says how many tokens were actually seen
    (fewer than asked when the source is shorter); medians use the first tokens holding at most
    ``max_nonzero`` nonzeros (``attrs["median_tokens"]``; whole chunks of the source).
    """
    counter = metrics.FiringCounter(sae.cfg.d_sae, device=sae.W_enc.device)
    sample: list[torch.Tensor] = []

    def observed() -> Iterator[torch.Tensor]:  # counts every token and keeps the sample
        for f in feature_batches(source, sae, n_tokens):
            counter.update(f)
            got = sum(s.shape[0] for s in sample)
            if got < sample_tokens:
                sample.append(f[: sample_tokens - got])
            yield f

    index = NonzeroIndex.from_batches(observed(), sae.cfg.d_sae, max_nonzero)
    freq = counter.frequency().double().cpu()
    per_feature = pd.DataFrame({
        "feature": np.arange(sae.cfg.d_sae, dtype=np.int64),
        "frequency": freq.numpy(),
        "fires": counter.counts.cpu().numpy().astype(np.int64),
        "max_activation": index.quantile(1.0).nan_to_num(0.0).numpy().astype(np.float64),
        "median_nonzero": index.quantile(0.5).numpy().astype(np.float64),
        "log10_frequency": np.where(freq.numpy() > 0, np.log10(np.maximum(freq.numpy(), 1e-300)),
                                    np.nan),
    })
    per_feature.attrs.update(n_tokens=counter.tokens, median_tokens=index.n_tokens)
    sample_df = _sample_frame(torch.cat(sample) if sample else torch.zeros(0, sae.cfg.d_sae))
    return per_feature, sample_df


def _sample_frame(f: torch.Tensor) -> pd.DataFrame:
    """The nonzeros of ``f`` (on any device; only they are copied to the host)."""
    tok, feat = f.nonzero(as_tuple=True)
    df = pd.DataFrame({"token": tok.cpu().numpy().astype(np.int64),
                       "feature": feat.cpu().numpy().astype(np.int64),
                       "activation": f[tok, feat].cpu().numpy().astype(np.float64)})
    df.attrs.update(n_tokens=int(f.shape[0]))
    return df


SUMMARY_COLUMNS = ("dead_fraction", "low_freq_fraction", "median_nonzero", "feature_tokens")
"""The columns of ``summarize`` that each SAE's row in trials.parquet carries."""


def summarize(per_feature: pd.DataFrame, activation_sample: pd.DataFrame) -> dict:
    """Dead and low-frequency counts/fractions and the sample's median nonzero activation."""
    freq = torch.as_tensor(per_feature["frequency"].to_numpy(np.float64, copy=True))
    acts = torch.as_tensor(activation_sample["activation"].to_numpy(np.float64, copy=True))
    n = max(len(per_feature), 1)
    dead, low = metrics.dead_count(freq), metrics.low_frequency_count(freq)
    return {"dead_count": dead, "low_freq_count": low, "dead_fraction": dead / n,
            "low_freq_fraction": low / n, "median_nonzero": metrics.median_nonzero(acts),
            "feature_tokens": int(per_feature.attrs.get("n_tokens", 0))}


def histogram(values: np.ndarray, bins: int | np.ndarray = 50) -> pd.DataFrame:
    """Counts per bin: columns bin_left, bin_right, count."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins)
    return pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:], "count": counts})


def frequency_histogram(per_feature: pd.DataFrame, bin_width: float = 0.25) -> pd.DataFrame:
    """Histogram of log10 frequency of the features that fire (dead ones are not in it)."""
    logf = per_feature["log10_frequency"].dropna().to_numpy()
    low = np.floor(min(logf.min(), -5.0) if len(logf) else -5.0)
    return histogram(logf, np.arange(low, bin_width / 2, bin_width))


def activation_histogram(activation_sample: pd.DataFrame, bins: int = 50) -> pd.DataFrame:
    """Histogram of the sample's nonzero activations (the study's first-4000-token figure)."""
    return histogram(activation_sample["activation"].to_numpy(), bins)


def save_feature_statistics(out_dir: str | os.PathLike, per_feature: pd.DataFrame,
                            activation_sample: pd.DataFrame) -> dict[str, Path]:
    """feature_stats, activation_samples and both histograms as Parquet files in ``out_dir``."""
    out = Path(out_dir)
    frames = {"feature_stats": per_feature, "activation_samples": activation_sample,
              "frequency_histogram": frequency_histogram(per_feature),
              "activation_histogram": activation_histogram(activation_sample)}
    return {name: io.write_parquet(df, out / f"{name}.parquet") for name, df in frames.items()}
