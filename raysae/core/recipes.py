"""Training recipes of penalty SAEs (a registry): how the decoder is parametrised, how the
penalty sees it, and whether gradients are clipped.

Three recipes ship:

- ``study``: the study's SAE, kept exactly for reproducing it: decoder rows at unit norm
  after every step (the gradient's component along each row removed first), random unit
  rows at start, the penalty on f itself, no clipping.
- ``free_norm`` (the default): decoder rows free, initialised at norm 1.0 with the encoder
  as the decoder's transpose, the penalty on ``f_i ||d_i||`` (each feature's contribution
  to the reconstruction; Anthropic's April 2024 update), the gradient norm clipped at 1.0
  per SAE.
- ``saelens``: the same with SAELens 6's decoder initial norm, 0.1 (its standard trainer).

What matters, measured on the local default (README "Training recipe"): the gradient
clipping. Without it, CE at L0 16 is about 0.2 nats worse under either decoder.

Why ``rho(f_i ||d_i||)`` and not ``||d_i|| rho(f_i)``: with free norms, scaling encoder
row i by c and decoder row i by 1/c leaves the reconstruction unchanged. ``f_i ||d_i||`` is
invariant to it, so ``rho(f_i ||d_i||)`` is too, for every family; ``||d_i|| rho(f_i)``
becomes ``c^(p-1) ||d_i|| f_i^p`` for the power family, which for p < 1 the optimiser can
drive to 0 by growing c (shrinking the decoder) without making anything sparser. For L1
the two are the same. (``benchmarks/recipe_ablation.py`` measures both.)

TopK and BatchTopK (kinds without a penalty) always keep unit-norm rows: raysae's TopK is
on par with SAELens's that way; the recipe governs the kinds with a penalty.

Saved SAEs fold the decoder norms into the encoder (``SAE.fold_decoder_norms_``): unit
rows on disk and features ``f_i ||d_i||``, so SAELens loads them as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from raysae.registry import Registry
from raysae.settings import check_choices

Weighting = Literal["none", "inside", "outside"]


@dataclass(frozen=True)
class Recipe:
    """One way to train a penalty SAE (see the module doc)."""

    name: str
    unit_norm_decoder: bool
    """Keep decoder rows at unit norm after every step (and drop the gradient along them)."""
    decoder_init_norm: float
    """Norm of every decoder row at initialisation (the encoder starts as its transpose)."""
    penalty_weighting: Weighting
    """How the penalty sees the decoder norms: 'none' rho(f_i); 'inside' rho(f_i ||d_i||);
    'outside' ||d_i|| rho(f_i)."""
    grad_clip: float | None
    """Clip each SAE's gradient norm (over all its weights) to this; None: no clipping."""
    doc: str = ""

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.decoder_init_norm > 0:
            raise ValueError(f"recipe {self.name!r}: decoder_init_norm must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"recipe {self.name!r}: grad_clip must be None or > 0")


RECIPES: Registry[Recipe] = Registry("recipe")
UNIT_NORM = "study"
"""The recipe of the kinds without a penalty (TopK, BatchTopK)."""


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe under its name (the ``--recipe`` flag lists them)."""
    return RECIPES.add(recipe.name, recipe)


def get_recipe(name: str) -> Recipe:
    return RECIPES.get_entry(name)


register_recipe(Recipe(
    "study", unit_norm_decoder=True, decoder_init_norm=1.0, penalty_weighting="none",
    grad_clip=None, doc="the study's: unit-norm decoder rows, penalty on f, no clipping"))
register_recipe(Recipe(
    "free_norm", unit_norm_decoder=False, decoder_init_norm=1.0, penalty_weighting="inside",
    grad_clip=1.0, doc="free decoder norms (init 1.0), penalty on f_i ||d_i||, gradient "
    "norm clipped at 1: the best measured (benchmarks/recipe_ablation.py)"))
register_recipe(Recipe(
    "saelens", unit_norm_decoder=False, decoder_init_norm=0.1, penalty_weighting="inside",
    grad_clip=1.0, doc="SAELens 6's standard trainer: free_norm with decoder rows "
    "initialised at norm 0.1"))
