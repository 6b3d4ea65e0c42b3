"""The sparse training step of ReLU SAEs: once the controller has converged, L0 is 1-3% of
d_sae, so after the encoder's one dense product every other product of the step touches
only the active (member, token, feature) triples.

Forward: ``pre = (x - b_dec) W_enc + b_enc`` densely (it decides which features fire), then
the positive entries ``values`` with their (member, token, feature) and the decoder as an
``embedding_bag`` over the active decoder rows weighted by ``values``. Backward: the
decoder's ``embedding_bag`` gives the value gradients (one dot product per active entry) and
the decoder-row gradients (gathered rows only); ``_ActiveEncode`` turns the value gradients
into encoder gradients with one more ``embedding_bag`` over the input rows, grouped by
feature, instead of the dense ``[d_in, B] x [B, d_sae]`` product. The result equals the
dense step's (``relu`` has zero gradient where ``pre <= 0``, and every penalty has
``rho(0) = 0``) up to the order of floating-point sums.

Finding the active entries is ``nonzero``, which on a GPU waits for the device; the trainer
uses this step on CPU only unless told otherwise (``TrainConfig.sparse_step``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ActiveFeatures(NamedTuple):
    """The positive pre-activations of a [K, B, d_sae] batch, in (member, token, feature)
    order; ``values`` carries the encoder's gradient."""

    values: torch.Tensor
    member: torch.Tensor
    token: torch.Tensor
    feature: torch.Tensor
    shape: tuple[int, int, int]

    def dense(self) -> torch.Tensor:
        """f as a dense [K, B, d_sae] tensor (detached; for metrics on logging steps)."""
        k, b, d = self.shape
        flat = (self.member * b + self.token) * d + self.feature
        out = self.values.new_zeros(k * b * d)
        return out.index_put_((flat,), self.values.detach()).view(k, b, d)

    def per_member(self, per_entry: torch.Tensor) -> torch.Tensor:
        """Sum a per-entry quantity [nnz] over each member's entries: [K]."""
        return per_entry.new_zeros(self.shape[0]).index_add(0, self.member, per_entry)

    def fires(self) -> torch.Tensor:
        """[K, d_sae] int: how many tokens of the batch fire each feature."""
        k, _, d = self.shape
        return torch.bincount(self.member * d + self.feature, minlength=k * d).view(k, d)


def _offsets(bag: torch.Tensor, n_bags: int) -> torch.Tensor:
    """Start of each bag in ``bag`` (sorted ascending) for ``embedding_bag``."""
    counts = torch.bincount(bag, minlength=n_bags)
    return counts.cumsum(0) - counts


class _ActiveEncode(torch.autograd.Function):
    """(W_enc, b_enc, b_dec, x) -> the positive pre-activations, where they are, and their
    feature-major order (``by_feature``; int32 keys: torch's int64 sort is ~100x slower on
    these nearly sorted keys) with each (member, feature)'s start in it."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, b_dec, x):
        k, _, d_sae = W_enc.shape
        b = x.shape[0]
        pre = torch.baddbmm(b_enc.unsqueeze(1), x.unsqueeze(0) - b_dec.unsqueeze(1), W_enc)
        flat = pre.view(-1)
        where = (flat > 0).nonzero().squeeze(1)
        values = flat[where]
        del pre, flat
        member = where // (b * d_sae)
        rest = where - member * (b * d_sae)
        token = rest // d_sae
        feature = rest - token * d_sae
        column = member * d_sae + feature
        by_feature = torch.sort(column.int(), stable=True).indices
        starts = _offsets(column, k * d_sae)
        ctx.save_for_backward(W_enc, b_dec, x, token, column, by_feature, starts)
        ctx.mark_non_differentiable(member, token, feature, by_feature, starts)
        return values, member, token, feature, by_feature, starts

    @staticmethod
    def backward(ctx, grad_values, *_):
        W_enc, b_dec, x, token, column, by_feature, starts = ctx.saved_tensors
        k, d_in, d_sae = W_enc.shape
        grad_b_enc = grad_values.new_zeros(k * d_sae).index_add_(0, column, grad_values)
        # per (member, feature): sum over its tokens of g * (x - b_dec)
        by_column = F.embedding_bag(token[by_feature], x, starts, mode="sum",
                                    per_sample_weights=grad_values[by_feature])
        grad_b_enc = grad_b_enc.view(k, d_sae)
        grad_w = by_column.view(k, d_sae, d_in) - grad_b_enc.unsqueeze(2) * b_dec.unsqueeze(1)
        grad_b_dec = -torch.bmm(W_enc, grad_b_enc.unsqueeze(2)).squeeze(2)
        return grad_w.transpose(1, 2), grad_b_enc, grad_b_dec, None


class _DecoderRowsGrad(torch.autograd.Function):
    """Identity on x_hat whose backward adds W_dec's gradient from the active rows only,
    grouped by feature (``embedding_bag``'s own weight gradient sorts int64 keys: slow)."""

    @staticmethod
    def forward(ctx, x_hat, W_dec, values, bag, by_feature, starts):
        ctx.save_for_backward(values, bag, by_feature, starts)
        ctx.shape = W_dec.shape
        return x_hat.view_as(x_hat)

    @staticmethod
    def backward(ctx, grad):
        values, bag, by_feature, starts = ctx.saved_tensors
        grad_rows = F.embedding_bag(bag[by_feature], grad.reshape(-1, ctx.shape[-1]), starts,
                                    mode="sum", per_sample_weights=values[by_feature])
        return grad, grad_rows.view(ctx.shape), None, None, None, None


def active_forward(model, x: torch.Tensor) -> tuple[torch.Tensor, ActiveFeatures]:
    """x [B, d_in] -> (x_hat [K, B, d_in], the active features) of a relu LadderSAE."""
    k, d_sae, d_in = model.W_dec.shape
    b = x.shape[0]
    values, member, token, feature, by_feature, starts = _ActiveEncode.apply(
        model.W_enc, model.b_enc, model.b_dec, x)
    bag = member * b + token
    x_hat = F.embedding_bag(member * d_sae + feature, model.W_dec.detach().view(k * d_sae, d_in),
                            _offsets(bag, k * b), mode="sum", per_sample_weights=values)
    x_hat = _DecoderRowsGrad.apply(x_hat, model.W_dec, values.detach(), bag, by_feature, starts)
    return x_hat.view(k, b, d_in) + model.b_dec.unsqueeze(1), ActiveFeatures(
        values, member, token, feature, (k, b, d_sae))
