"""Harvest throughput: the Ray Data pipeline vs a bare in-process loop, and stopping the LM
at the hooked layer vs the full forward, all in one run, printed as ratios.

Model: Pythia-70M-shaped GPT-NeoX (d_model 512, 6 layers, 50304-token vocabulary) with
random weights (timing does not depend on the weights), hook blocks.3.hook_resid_post.
Goals: pipeline >= 0.85x the bare loop; stopped >= 3x faster than the full forward.

    python benchmarks/harvest_throughput.py [--blocks 192] [--batch-blocks 16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from raysae.activations import ActivationSource, iter_harvest, source_blocks, to_storage
from raysae.local_model import LocalModelSpec, build_local_model, cache_dir
from raysae.models import hook_activations, load_model, stop_layer

PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=2048,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.25},
                  use_parallel_residual=True, bos_token_id=0, eos_token_id=0)


def pythia_shaped_checkpoint() -> Path:
    """A random-weight Pythia-70M-shaped checkpoint (with the tiny local tokenizer)."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    out = cache_dir() / "models" / "bench-pythia70m-random"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        GPTNeoXForCausalLM(GPTNeoXConfig(**PYTHIA_70M)).save_pretrained(tmp)
        tiny = build_local_model(LocalModelSpec.tiny(), progress=False)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def bare_loop(model, blocks: torch.Tensor, src: ActivationSource, stop) -> float:
    """Tokens/s of the same work the Harvester does, in this process, no Ray."""
    start, n = time.perf_counter(), 0
    for i in range(0, len(blocks), src.batch_blocks):
        acts = hook_activations(model, blocks[i : i + src.batch_blocks], src.hook, stop=stop)
        rows = to_storage(acts[:, 1:].reshape(-1, acts.shape[-1]), src.dtype)
        n += len(rows)
    return n / (time.perf_counter() - start)


def pipeline(src: ActivationSource, blocks) -> tuple[float, float]:
    """(steady-state, end-to-end) tokens/s of the Ray pipeline; steady state starts at the
    first output batch, so actor start-up (process + model load) is left out of it."""
    start = time.perf_counter()
    first_t, first_n, n = None, 0, 0
    for batch in iter_harvest(src, blocks):
        n += len(batch["act"])
        if first_t is None:
            first_t, first_n = time.perf_counter(), n
    end = time.perf_counter()
    return (n - first_n) / (end - first_t), n / (end - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=192, help="token blocks per measurement")
    parser.add_argument("--batch-blocks", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs; best is kept")
    args = parser.parse_args(argv)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    path = pythia_shaped_checkpoint()
    n_tokens = args.blocks * (args.context_length - 1)
    src = ActivationSource(model=str(path), hook=args.hook, context_length=args.context_length,
                           n_tokens=n_tokens, batch_blocks=args.batch_blocks, num_actors=1,
                           cpus_per_actor=1 if gpus else os.cpu_count())
    blocks = source_blocks(src)
    model = load_model(path)
    stop = stop_layer(model, args.hook)
    tok = torch.from_numpy(blocks).long()
    bare_loop(model, tok[: args.batch_blocks], src, stop)  # warm-up
    bare, full, steady, e2e = [], [], [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine may be shared
        bare.append(bare_loop(model, tok, src, stop))
        full.append(bare_loop(model, tok, src, None))
        s, e = pipeline(src, blocks)
        steady.append(s)
        e2e.append(e)
    bare, full, steady, e2e = max(bare), max(full), max(steady), max(e2e)
    device = "cuda" if gpus else f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    print(f"model: Pythia-70M-shaped, random weights; hook {args.hook} (stop_at_layer={stop}); "
          f"{n_tokens} tokens, batches of {args.batch_blocks}x{args.context_length}; {device}; "
          f"best of {args.repeats}")
    print(f"bare loop, stopped at layer : {bare:10.0f} tok/s")
    print(f"bare loop, full forward     : {full:10.0f} tok/s")
    print(f"ray pipeline, steady state  : {steady:10.0f} tok/s")
    print(f"ray pipeline, end to end    : {e2e:10.0f} tok/s  (includes actor start-up)")
    print(f"pipeline / bare loop        : {steady / bare:6.2f}x steady  ({e2e / bare:.2f}x end to "
          f"end)  goal >= 0.85x")
    print(f"stopped / full forward      : {bare / full:6.2f}x  goal >= 3x")
    ray.shutdown()


if __name__ == "__main__":
    main()
