"""Harvest throughput: the Ray Data pipeline vs a bare in-process loop, and stopping the LM
at the hooked layer vs the full forward, all in one run, printed as ratios.

Model: Pythia-70M-shaped GPT-NeoX (d_model 512, 6 layers, 50304-token vocabulary) with
random weights (timing does not depend on the weights), hook blocks.3.hook_resid_post.
Goals: pipeline >= 0.85x the bare loop; stopped >= 3x faster than the full forward.

    python benchmarks/harvest_throughput.py [--blocks 192] [--batch-blocks 16]

OpenMP threads are told to sleep rather than spin while waiting (OMP_WAIT_POLICY=PASSIVE,
set before torch loads and inherited by the Ray workers): on a machine whose cores are shared
with other jobs, spinning threads made the in-process loop ~2.5x slower and the comparison
meaningless. Set OMP_WAIT_POLICY yourself to override.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)

from raysae.activations.harvest import iter_harvest
from raysae.activations.source import ActivationSource, source_blocks, to_storage
from raysae.lm.local_model import LocalModelSpec, build_local_model, cache_dir
from raysae.lm.models import hook_activations, load_model, stop_layer

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


def bare_loop(model, blocks: torch.Tensor, src: ActivationSource, stop) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of the Harvester's work done in this
    process without Ray."""
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for i in range(0, len(blocks), src.batch_blocks):
        acts = hook_activations(model, blocks[i : i + src.batch_blocks], src.hook, stop=stop)
        n += len(to_storage(acts[:, 1:].reshape(-1, acts.shape[-1]), src.dtype))
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def _harvester_cpu_seconds(procs: dict) -> float:
    """CPU seconds used so far by the live Harvester actor processes (found on first call)."""
    import psutil
    import ray

    for actor in ray._private.state.actors().values():  # GCS table: no dashboard needed
        if "Harvester" in actor["ActorClassName"] and actor["State"] == "ALIVE":
            procs.setdefault(actor["Pid"], psutil.Process(actor["Pid"]))
    total = 0.0
    for proc in procs.values():
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def pipeline(src: ActivationSource, blocks) -> tuple[float, float, float]:
    """(steady wall, end-to-end wall, steady CPU) tokens/s of the Ray pipeline. Steady state
    runs from the first output batch to the last, leaving out actor start-up (process + model
    load); its CPU seconds are the actors' plus this driver's over that window."""
    start = time.perf_counter()
    procs: dict = {}
    first = None
    n = 0
    for batch in iter_harvest(src, blocks):
        n += len(batch["act"])
        now = (time.perf_counter(), time.process_time() + _harvester_cpu_seconds(procs), n)
        first = first or now
    wall, cpu, rows = (now[i] - first[i] for i in range(3))
    return rows / wall, n / (now[0] - start), rows / cpu


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
    runs = {"bare": [], "full": [], "pipe": []}
    for _ in range(args.repeats):  # interleaved, best of each: the machine may be shared
        runs["bare"].append(bare_loop(model, tok, src, stop))
        runs["full"].append(bare_loop(model, tok, src, None))
        runs["pipe"].append(pipeline(src, blocks))
    best = {k: [max(col) for col in zip(*v)] for k, v in runs.items()}
    (bare, bare_cpu), (full, full_cpu), (steady, e2e, pipe_cpu) = best.values()
    device = "cuda" if gpus else f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    print(f"model: Pythia-70M-shaped, random weights; hook {args.hook} (stop_at_layer={stop}); "
          f"{n_tokens} tokens, batches of {args.batch_blocks}x{args.context_length}; {device}; "
          f"best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'':30s}{'tok/s (wall)':>14s}{'tok/CPU-s':>12s}")
    print(f"{'bare loop, stopped at layer':30s}{bare:14.0f}{bare_cpu:12.0f}")
    print(f"{'bare loop, full forward':30s}{full:14.0f}{full_cpu:12.0f}")
    print(f"{'ray pipeline, steady state':30s}{steady:14.0f}{pipe_cpu:12.0f}")
    print(f"{'ray pipeline, end to end':30s}{e2e:14.0f}{'':12s}  (with actor start-up)")
    print(f"pipeline / bare loop: {steady / bare:.2f}x wall, {pipe_cpu / bare_cpu:.2f}x per CPU "
          f"second ({e2e / bare:.2f}x end to end)   goal >= 0.85x")
    print(f"stopped / full forward: {bare / full:.2f}x wall, {bare_cpu / full_cpu:.2f}x per CPU "
          "second   goal >= 3x")
    ray.shutdown()


if __name__ == "__main__":
    main()
