"""An SAE with SAELens's inference architectures (raysae.core.architectures, a registry, each
declaring its tensors); x_hat = W_dec f + b_dec for all, and for these three
``pre = W_enc (x - b_dec) + b_enc``:

- ``standard``: f = relu(pre) (the study's SAE; raysae kinds ``relu``, ``panneal``);
- ``topk``: f = the k largest pre per token, relu'd, the rest 0 (kind ``topk``);
- ``jumprelu``: f = relu(pre) * (pre > threshold), a per-feature threshold (kind
  ``jumprelu``; ``batchtopk`` and ``matryoshka`` are saved so, with their one learned
  threshold for every feature, as SAELens converts BatchTopK).

Saved in SAELens's layout, so ``sae_lens.SAE.load_from_disk`` reads it: a directory
holding

- ``sae_weights.safetensors`` with the architecture's tensors, SAELens's names and shapes
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``, ``b_dec [d_in]``,
  plus ``threshold [d_sae]`` for jumprelu, a raw threshold, not its log; another
  architecture declares its own set, raysae.core.architectures);
- ``cfg.json`` with SAELens's fields ``architecture`` ("standard" / "topk" / "jumprelu"),
  ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input=true``,
  ``normalize_activations="none"`` (any training-time scaling is folded into the weights;
  k and threshold act on pre, which folding leaves unchanged), for topk also ``k`` (int)
  and ``rescale_acts_by_decoder_norm=false``, and ``metadata`` (``model_name``,
  ``hook_name``, ...); raysae's own settings (kind, penalty, lambda, training config) sit
  under the extra key ``"raysae"``, which SAELens ignores.

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

from raysae.core.architectures import ARCHITECTURES, SAELoadError, get_architecture
from raysae.core.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
__all__ = ["ARCHITECTURES", "SAE", "SAELoadError", "read_sae_config"]


class SAE(nn.Module):
    """An SAE of one inference architecture (module doc): ``SAE(cfg, architecture,
    **values)`` holds every tensor the architecture declares (``values`` may give any of
    them, and must give its fields, e.g. topk's ``k``); the others start as SAELens's:
    random unit decoder rows (from ``seed``), the encoder their transpose, zeros elsewhere.
    """

    def __init__(self, cfg: SAEConfig, architecture: str = "standard", *, seed: int | None = 0,
                 **values: Any):
        super().__init__()
        self.arch = get_architecture(architecture)
        self.cfg, self.architecture = cfg, architecture
        unknown = set(values) - set(self.arch.tensors) - set(self.arch.fields)
        if unknown:
            raise ValueError(f"architecture {architecture!r} has no tensor or field "
                             f"{sorted(unknown)}; it has {[*self.arch.tensors, *self.arch.fields]}")
        self.arch.check(self, values)
        for name in self.arch.fields:
            setattr(self, name, values[name])
        dims = {"d_in": cfg.d_in, "d_sae": cfg.d_sae}
        start = {} if set(self.arch.tensors) <= set(values) else self._initial(seed)
        for name, shape in self.arch.tensors.items():
            value = values.get(name)
            if value is None:
                value = start.get(name, torch.zeros(*(dims[d] for d in shape)))
            value = torch.as_tensor(value, dtype=torch.float32).reshape(
                *(dims[d] for d in shape)).clone(memory_format=torch.contiguous_format)
            if name in self.arch.buffers:
                self.register_buffer(name, value)
            else:
                setattr(self, name, nn.Parameter(value))

    def _initial(self, seed: int | None) -> dict[str, torch.Tensor]:
        """SAELens's start: random unit decoder rows, the encoder their transpose."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        return {"W_dec": w_dec, "W_enc": w_dec.T.clone()}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the architecture, by name (what is saved)."""
        return {name: getattr(self, name) for name in self.arch.tensors}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.arch.encode(self, x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x_hat, f)."""
        f = self.encode(x)
        return self.decode(f), f

    def normalize_decoder_(self) -> None:
        """Put every decoder row back at unit norm (called after each optimiser step)."""
        unit_rows_(self.W_dec)

    def remove_parallel_grad_(self) -> None:
        """Drop the gradient component along each decoder row (it would only change the norm)."""
        remove_parallel_grad_(self.W_dec)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Put decoder rows at unit norm without changing x_hat: feature i becomes
        ``f_i ||d_i||`` (as SAELens's ``fold_W_dec_norm``), so L0 and x_hat are unchanged;
        the architecture scales what makes the feature (a threshold with it). Not for topk,
        whose ranking would change."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.arch.fold_norms_(self, norms)  # first: topk refuses before anything moves
        self.W_dec /= norms.unsqueeze(1)

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
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        cfg = {"architecture": self.architecture, "d_in": self.cfg.d_in,
               "d_sae": self.cfg.d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": metadata or {}, "raysae": raysae or {}}
        cfg.update(self.arch.cfg_fields(self))
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
        """Read an SAE saved by ``save`` (or SAELens: standard, topk, jumprelu); no pickle."""
        cfg = read_sae_config(path)
        try:
            tensors = load_file(str(Path(path) / WEIGHTS_FILE), device=device)
        except (SafetensorError, OSError, ValueError) as exc:
            raise SAELoadError(
                f"{Path(path) / WEIGHTS_FILE} is unreadable ({exc}); re-save or re-train the SAE"
            ) from None
        arch = get_architecture(cfg.get("architecture", "standard"))
        dims = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"])}
        for name, shape in arch.tensors.items():
            want = tuple(dims[d] for d in shape)
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != want:
                raise SAELoadError(f"{path}: tensor {name} has shape {got}, expected {want} "
                                   f"from cfg.json; the files do not belong together")
            if not torch.isfinite(tensors[name]).all():
                raise SAELoadError(f"{path}: tensor {name} holds NaN/inf; the SAE diverged")
        sae = cls(SAEConfig(**dims), arch.name, seed=None,
                  **{k: cfg[k] for k in arch.fields},
                  **{k: tensors[k].float() for k in arch.tensors})
        return sae.to(device)


@torch.no_grad()
def unit_rows_(w: torch.Tensor) -> None:
    """Scale every row (last dimension) of ``w`` to unit norm, in place; ``w`` may be one
    decoder [d_sae, d_in] or a stack of them [K, d_sae, d_in]."""
    w /= w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def remove_parallel_grad_(w: torch.Tensor) -> None:
    """Drop from ``w.grad`` its component along each row of ``w`` (last dimension)."""
    if w.grad is None:
        return
    rows = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w.grad -= (w.grad * rows).sum(dim=-1, keepdim=True) * rows


def read_sae_config(path: str | os.PathLike) -> dict[str, Any]:
    """The cfg.json of an SAE directory, checked for the fields raysae needs."""
    cfg_path = Path(path) / CONFIG_FILE
    if not Path(path).exists():
        raise SAELoadError(f"{path}: no such folder; pass the directory of a trained SAE "
                           f"(cfg.json and sae_weights.safetensors, written by raysae or "
                           f"SAELens)")
    if not Path(path).is_dir():
        raise SAELoadError(f"{path} is a file, not an SAE directory; pass the directory "
                           f"holding its {CONFIG_FILE}")
    if not cfg_path.is_file():
        raise SAELoadError(f"{path} is not an SAE directory: no {CONFIG_FILE}; "
                           f"pass the directory written by raysae (or SAELens)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAELoadError(f"{cfg_path} is not valid JSON ({exc}); the file is truncated "
                           f"or corrupt") from None
    arch = cfg.get("architecture", "standard")
    if arch not in ARCHITECTURES:
        raise SAELoadError(f"{cfg_path}: architecture {arch!r} is not supported; "
                           f"only {tuple(ARCHITECTURES)}")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise SAELoadError(f"{cfg_path}: field {key!r} = {cfg.get(key)!r} must be an int >= 1")
    problem = ARCHITECTURES[arch].check_cfg(cfg)
    if problem:
        raise SAELoadError(f"{cfg_path}: {problem}")
    if cfg.get("normalize_activations", "none") != "none":
        raise SAELoadError(f"{cfg_path}: normalize_activations="
                           f"{cfg['normalize_activations']!r} is not supported; fold it first")
    return cfg


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
