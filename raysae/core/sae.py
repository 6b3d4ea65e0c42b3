"""The standard SAE: f = relu(W_enc (x - b_dec) + b_enc), x_hat = W_dec f + b_dec.

Saved in SAELens's layout for a standard SAE, so ``sae_lens.SAE.load_from_disk``
reads it: a directory holding

- ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc [d_sae]``, ``b_dec [d_in]`` (SAELens's names and shapes);
- ``cfg.json`` with SAELens's fields ``architecture="standard"``, ``d_in``, ``d_sae``,
  ``dtype``, ``device``, ``apply_b_dec_to_input=true``, ``normalize_activations="none"``
  (any training-time scaling is folded into the weights), and ``metadata``
  (``model_name``, ``hook_name``, ...); raysae's own settings (penalty, lambda, training
  config) sit under the extra key ``"raysae"``, which SAELens ignores.

Loading never unpickles: safetensors holds only tensors and JSON only data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from raysae.core.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",),
           "b_dec": ("d_in",)}


class SAELoadError(ValueError):
    """An SAE directory is missing, truncated, or not what it claims to be."""


class SAE(nn.Module):
    """Untied ReLU SAE with a pre-encoder bias and unit-norm decoder rows."""

    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x_hat, f)."""
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Put every decoder row back at unit norm (called after each optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row (it would only change the norm)."""
        if self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        along = (self.W_dec.grad * rows).sum(dim=1, keepdim=True)
        self.W_dec.grad -= along * rows

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` read raw ``x`` and output raw ``x_hat``.

        Features are unchanged; decoder rows end at norm 1/scale (as SAELens folds it).
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
             raysae: dict[str, Any] | None = None) -> Path:
        """Write the SAELens layout atomically (temp dir, then rename). Returns the directory."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        tensors = {k: getattr(self, k).detach().float().cpu().contiguous() for k in _SHAPES}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        cfg = {"architecture": "standard", "d_in": self.cfg.d_in, "d_sae": self.cfg.d_sae,
               "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": metadata or {}, "raysae": raysae or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _rmtree(old)
        else:
            os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> SAE:
        """Read an SAE saved by ``save`` (or SAELens, standard architecture); no pickle."""
        cfg = read_sae_config(path)
        try:
            tensors = load_file(str(Path(path) / WEIGHTS_FILE), device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise SAELoadError(
                f"{Path(path) / WEIGHTS_FILE} is unreadable ({exc}); re-save or re-train the SAE"
            ) from None
        sae = cls(SAEConfig(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"])), seed=None)
        dims = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae}
        for name, shape in _SHAPES.items():
            want = tuple(dims[d] for d in shape)
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != want:
                raise SAELoadError(f"{path}: tensor {name} has shape {got}, expected {want} "
                                   f"from cfg.json; the files do not belong together")
            if not torch.isfinite(tensors[name]).all():
                raise SAELoadError(f"{path}: tensor {name} holds NaN/inf; the SAE diverged")
        sae.load_state_dict({k: tensors[k].float() for k in _SHAPES})
        return sae.to(device)


def read_sae_config(path: str | os.PathLike) -> dict[str, Any]:
    """The cfg.json of an SAE directory, checked for the fields raysae needs."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise SAELoadError(f"{path} is not an SAE directory: no {CONFIG_FILE}; "
                           f"pass the directory written by raysae (or SAELens)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAELoadError(f"{cfg_path} is not valid JSON ({exc}); the file is truncated "
                           f"or corrupt") from None
    arch = cfg.get("architecture", "standard")
    if arch != "standard":
        raise SAELoadError(f"{cfg_path}: architecture {arch!r} is not supported; only 'standard'")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise SAELoadError(f"{cfg_path}: field {key!r} = {cfg.get(key)!r} must be an int >= 1")
    if cfg.get("normalize_activations", "none") != "none":
        raise SAELoadError(f"{cfg_path}: normalize_activations="
                           f"{cfg['normalize_activations']!r} is not supported; fold it first")
    return cfg


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
