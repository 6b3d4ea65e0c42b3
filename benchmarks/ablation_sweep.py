"""Cost of the whole 4-method ablation sweep against one full CE evaluation, same run.

Model: a Pythia-70M-shaped GPT-NeoX (6 layers, d_model 512, 50304-token vocabulary; random
weights: timing does not depend on them) or ``--model PATH``; hook blocks.3.hook_resid_post;
an SAE with 4x features whose encoder bias is set for L0 ~ 64.

Printed, in seconds and as ratios:
- full CE evaluation: ce_sae of one SAE by full forwards with a replacing hook (what each
  sweep point would cost if the layers before the hook were rerun);
- evaluator setup: the clean forward (ce_clean + cached hook activations) and ce_zero;
- one resumed evaluation: only the layers after the hook;
- the sweep: ``ablation_sweep(n_points=10)`` over the four methods (calibration included).

Times are this process's CPU seconds on CPU (other agents share the cores here; wall time
would measure them too) and synchronised wall seconds on CUDA.

    python benchmarks/ablation_sweep.py [--blocks 16] [--ctx 128] [--threads 1] [--model PATH]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from raysae.core.config import SAEConfig
from raysae.core.sae import SAE
from raysae.evaluation.ablation import ablation_sweep
from raysae.evaluation.spliced_ce import Evaluator
from raysae.lm.local_model import LocalModelSpec, build_local_model
from raysae.lm.models import load_model

HOOK = "blocks.3.hook_resid_post"


def pythia_shaped(out: Path) -> Path:
    """Random-weight Pythia-70M-shaped checkpoint, with the tiny local model's tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                        num_attention_heads=8, intermediate_size=2048,
                        max_position_embeddings=2048, use_parallel_residual=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                         "partial_rotary_factor": 0.25},
                        bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    tok_dir = build_local_model(LocalModelSpec.tiny(), progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    return out


def sae_with_l0(evaluator: Evaluator, l0: int = 64, expansion: int = 4) -> SAE:
    """Random unit-norm dictionary; each feature's bias makes it fire on l0/d_sae of tokens."""
    x = evaluator.activations()
    d = x.shape[1]
    sae = SAE(SAEConfig(d, expansion * d))
    with torch.no_grad():
        pre = (x[:4096] - sae.b_dec) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 1 - l0 / sae.cfg.d_sae, dim=0))
    return sae


def timed(fn, device: str = "cpu"):
    """(result, seconds): CPU seconds of this process on CPU (robust to other processes
    sharing the cores; with one thread it equals wall time on an idle machine), wall seconds
    (synchronised) on CUDA."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - start
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def median_time(fn, rounds: int, device: str):
    times = sorted(timed(fn, device)[1] for _ in range(rounds))
    return fn(), times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-points", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="timings of single evaluations")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: random "
                        "Pythia-70M-shaped model)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or pythia_shaped(Path(tmp) / "pythia-shaped")
        model = load_model(path, device=args.device)
    vocab = model.original_model.get_output_embeddings().weight.shape[0]
    tokens = torch.randint(1, min(vocab, 512), (args.blocks, args.ctx),
                           generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    ev, t_setup = timed(lambda: Evaluator(model, HOOK, tokens, batch_size=args.batch_size),
                        args.device)
    slow = Evaluator(model, HOOK, tokens, batch_size=args.batch_size, resume=False)
    sae = sae_with_l0(ev).to(args.device)
    ev.evaluate(sae)  # warm-up
    full, t_full = median_time(lambda: slow.evaluate(sae), args.rounds, args.device)
    fast, t_fast = median_time(lambda: ev.evaluate(sae), args.rounds, args.device)
    assert abs(full["ce_sae"] - fast["ce_sae"]) < 1e-3, (full["ce_sae"], fast["ce_sae"])
    calls = []
    evaluate = ev.evaluate
    ev.evaluate = lambda *a, **k: calls.append(1) or evaluate(*a, **k)
    table, t_sweep = timed(lambda: ablation_sweep(ev, sae, n_points=args.n_points), args.device)
    n = len(calls)
    print(f"model {path if args.model else 'Pythia-70M-shaped (random weights)'}, hook {HOOK}, "
          f"{args.blocks}x{args.ctx} tokens, {args.threads} thread(s), {args.device}; "
          f"{'wall' if args.device.startswith('cuda') else 'CPU'} seconds")
    print(f"SAE d_sae={sae.cfg.d_sae}, L0 {fast['l0']:.1f}; sweep: {len(table)} rows, "
          f"{n} evaluations (the unablated and all-removed points are shared by the four methods)")
    print(f"full CE evaluation (full forward + replacing hook): {t_full:8.2f} s")
    print(f"evaluator setup (clean forward + ce_zero):          {t_setup:8.2f} s")
    print(f"one resumed evaluation (layers after the hook):     {t_fast:8.2f} s"
          f"   ratio to full: {t_fast / t_full:.3f}")
    print(f"whole sweep, resumed:                               {t_sweep:8.2f} s"
          f"   ratio to one full CE evaluation: {t_sweep / t_full:.2f}")
    print(f"same sweep with full forwards (estimated {n} x full): {n * t_full:8.2f} s"
          f"   speed-up from resuming: {n * t_full / t_sweep:.2f}x")


if __name__ == "__main__":
    main()
