"""Load a causal LM through TransformerLens 4's TransformerBridge; check and locate hooks.

The same `load_model` serves a hub name (default Pythia-70M-deduped) and a local HF
checkpoint folder, e.g. one made by `build_local_model` (re-exported here).
"""

from __future__ import annotations

import difflib
import logging
import os
import re

import torch

from raysae.lm.local_model import (  # noqa: F401  (re-exported: one place to get a model)
    LocalModelSpec,
    build_local_model,
    cache_dir,
    default_model,
    read_metadata,
)
from raysae.settings import UserError

DEFAULT_MODEL = "EleutherAI/pythia-70m-deduped"
DEFAULT_HOOK = "blocks.3.hook_resid_post"
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "embed.", "rotary_emb.", "pos_embed.")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """"local" -> the default local model's folder (built on first use), "local-tiny" -> the
    test-sized one; anything else (hub name or folder) unchanged."""
    name = os.fspath(name_or_path)
    if name == "local":
        return str(default_model())
    if name == "local-tiny":
        return str(build_local_model(LocalModelSpec.tiny(), progress=False))
    return name


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None):
    """A TransformerBridge in eval mode on `device` (CUDA when present, else CPU).

    `name_or_path`: a hub name, a local HF checkpoint folder, or "local" / "local-tiny"."""
    # on use: transformer_lens takes 1.4 s to import; only a loaded model needs it
    from transformer_lens.model_bridge import TransformerBridge

    name = resolve_model(name_or_path)
    if name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise UserError(f"model path {name!r} is not a folder; give a checkpoint dir or hub name")
    name = os.path.expanduser(name)
    device = device or default_device()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = TransformerBridge.boot_transformers(name, device=device)
    except OSError as err:  # hub unreachable / unknown name: say what to do
        raise UserError(
            f"cannot load model {name!r} ({err.__class__.__name__}: {str(err)[:200]}); "
            "give a local checkpoint folder (e.g. `raysae build-model`) or check the hub name"
        ) from err
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hook_names(model) -> list[str]:
    """Every hook name the model accepts: canonical names plus TransformerLens aliases."""
    # on use: transformer_lens takes 1.4 s to import; only a loaded model needs it
    from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map

    names = set(model.hook_dict)
    names.update(build_alias_to_canonical_map(model.hook_dict))
    return sorted(names)


def check_hook(model, hook_name: str, model_name: str | None = None) -> str:
    """Return `hook_name` if the model has it, else raise ValueError naming close matches."""
    names = hook_names(model)
    if hook_name in names:
        return hook_name
    close = difflib.get_close_matches(hook_name, names, n=3, cutoff=0.6)
    resid = [n for n in names if n.endswith("hook_resid_post")]
    span = f" (residual stream: {resid[0]} .. {resid[-1]})" if resid else ""
    raise UserError(f"--hook {hook_name} is not a hook of model {model_name or '(in memory)'};"
                     f" close matches: {close or 'none'}; pass --hook with a valid name{span}")


def hook_layer(hook_name: str) -> int:
    """The block index a hook belongs to (-1 for embedding hooks); stop at layer idx + 1."""
    match = _BLOCK_RE.match(hook_name)
    if match:
        return int(match.group(1))
    if hook_name.startswith(_EMBED_HOOKS):
        return -1
    raise UserError(
        f"hook {hook_name!r} is not inside a block or the embedding; use "
        "stop_layer(model, hook) (None: run the full forward) for final-layer hooks"
    )


def stop_layer(model, hook_name: str) -> int | None:
    """The `stop_at_layer` that still fires `hook_name`; None when the full forward is needed."""
    check_hook(model, hook_name)
    try:
        idx = hook_layer(hook_name)
    except ValueError:
        return None
    stop = idx + 1
    return stop if stop < model.cfg.n_layers else None


@torch.no_grad()
def hook_activations(model, tokens: torch.Tensor, hook_name: str,
                     stop: int | None | str = "auto") -> torch.Tensor:
    """Activations [batch, pos, d] at `hook_name`, running the model only as far as needed."""
    if stop == "auto":
        stop = stop_layer(model, hook_name)
    tokens = tokens.to(next(model.parameters()).device)
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=stop,
                                    return_cache_object=False)
    if hook_name in cache:
        return cache[hook_name]
    (value,) = cache.values()  # the bridge may key the cache by the canonical name
    return value
