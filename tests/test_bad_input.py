"""Bad input to the main job and the CLI: exit status 2, one `error:` line naming the flag and
the fix, and nothing written (no results folder, no Tune storage, the caches unchanged).

The job's entry (`raysae.search.job.main`, what searches/*.py call) runs in-process for most cases
and as a real subprocess for a few, on the tiny local model."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysae import cli
from raysae.activations.cache import build_cache, default_cache_root
from raysae.activations.source import ActivationSource

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
HOOK = "blocks.0.hook_resid_post"
CACHE_TOKENS = 2048


@pytest.fixture(scope="module")
def small_cache(tiny_model_dir, ray_local, tmp_path_factory):
    """A real activation cache of the tiny model: blocks.0 resid, context 32, 2048 tokens."""
    src = ActivationSource(model=str(tiny_model_dir), hook=HOOK, context_length=32,
                           n_tokens=CACHE_TOKENS, shard_rows=512, num_actors=1)
    return build_cache(src, tmp_path_factory.mktemp("acts"), progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_model_dir):
    """Bad text data and a model folder that is another model to the cache (no build hash)."""
    d = tmp_path_factory.mktemp("data")
    pq.write_table(pa.table({"body": ["some text here"] * 50}), d / "no_text_column.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "empty.parquet")
    (d / "empty.jsonl").write_text("")
    (d / "empty_folder").mkdir()
    (d / "not_a_model").mkdir()
    (d / "a_file").write_text("x")
    other = d / "other_model"
    shutil.copytree(tiny_model_dir, other)
    (other / "raysae_model.json").unlink()
    return d


def _base(tiny_model_dir, tmp_path):
    return ["--model", str(tiny_model_dir), "--hook", HOOK, "--context-length", "32",
            "--targets", "8", "--num-trials", "1", "--total-tokens", "4096",
            "--cache-tokens", str(CACHE_TOKENS), "--batch-size", "256",
            "--storage", str(tmp_path / "tune"), "--results", str(tmp_path / "results"),
            "--no-report"]


def _tree(*folders) -> list:
    """Every path (with size) under the folders: to show that nothing was written."""
    return sorted((str(p), p.stat().st_size if p.is_file() else -1)
                  for f in folders if Path(f).exists() for p in Path(f).rglob("*"))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err  # one line, and the last one
    return errors[0]


# (id, extra flags, phrases the error line must hold: the flag/field and the fix)
SEARCH_CASES = [
    ("p<=0", ["--power-p-range", "0", "1"], ["--power-p-range LOW = 0", "(0, 2]",
                                              "pass --power-p-range"]),
    ("p>2", ["--power-p-range", "0.5", "2.5"], ["--power-p-range HIGH = 2.5", "(0, 2]"]),
    ("eps<=0", ["--power-eps-range", "0", "10"], ["--power-eps-range 0 10", "log scale", "> 0",
                                                   "pass --power-eps-range"]),
    ("c of a family not searched", ["--tanh-c-range", "1", "10"],
     ["--tanh-c-range 1 10", "penalty 'tanh' is not searched (searched: power)",
      "--penalty"]),
    ("c<=0", ["--penalty", "tanh", "--tanh-c-range", "0", "10"],
     ["--tanh-c-range LOW = 0", "(0, inf)"]),
    ("unknown penalty", ["--penalty", "lp"], ["--penalty lp", "registered penalties",
                                              "'power'"]),
    ("negative lambda", ["--lambda-mode", "search", "--lam-range", "-1", "10"],
     ["--lam-range -1 10", "> 0", "pass --lam-range"]),
    ("target L0 <= 0", ["--targets", "0"], ["--targets 0", "> 0", "pass positive"]),
    ("target L0 > d_sae", ["--targets", "200"],
     ["--targets 200", "d_sae = 128", "--expansion 4 x d_in 32", "lower the target"]),
    ("d_sae not an integer", ["--expansion", "2.5"], ["--expansion", "invalid int", "--help"]),
    ("d_sae not positive", ["--expansion", "0"], ["--expansion 0", "positive integer",
                                                  "--expansion 4"]),
    ("batch larger than cache", ["--batch-size", "4096", "--total-tokens", "8192"],
     ["--batch-size 4096", f"--cache-tokens: {CACHE_TOKENS} tokens", "lower --batch-size"]),
    ("total tokens below one batch", ["--total-tokens", "100"],
     ["--total-tokens 100", "--batch-size 256"]),
    ("cpus per trial 0", ["--cpus-per-trial", "0"], ["--cpus-per-trial 0", "> 0"]),
    ("unknown hook", ["--hook", "blocks.0.hook_resid_pots"],
     ["--hook blocks.0.hook_resid_pots", "close matches", "'blocks.0.hook_resid_post'",
      "pass --hook"]),
    ("unknown model path", ["--model", "{tmp}/no_such_model"], ["--model", "no such folder",
                                                                 "checkpoint folder"]),
    ("model folder without config", ["--model", "{data}/not_a_model"],
     ["not a model checkpoint folder (no config.json)"]),
    ("hub model, offline", ["--model", "EleutherAI/pythia-70m-deduped"],
     ["--model EleutherAI/pythia-70m-deduped", "HF_HUB_OFFLINE", "raysae build-model"]),
    ("dataset without text column", ["--corpus", "{data}/no_text_column.parquet"],
     ["--text-column text", "['body']", "pass --text-column"]),
    ("empty dataset (parquet)", ["--corpus", "{data}/empty.parquet"], ["is empty (no rows)"]),
    ("empty dataset (jsonl)", ["--corpus", "{data}/empty.jsonl"], ["is empty (no rows)"]),
    ("empty dataset (folder)", ["--corpus", "{data}/empty_folder"],
     ["--corpus {data}/empty_folder is an empty folder"]),
    ("missing dataset file", ["--corpus", "{tmp}/nope.parquet"],
     ["--corpus", "no such file or folder"]),
    ("results under a file", ["--results", "{data}/a_file/results"],
     ["--results folder", "is a file, not a folder", "pass --results"]),
    ("pareto with control", ["--objective", "pareto"], ["--lambda-mode search"]),
    ("cache for another hook", ["--cache", "{cache}", "--hook", "blocks.1.hook_resid_post"],
     ["--cache", "hook 'blocks.0.hook_resid_post' (not 'blocks.1.hook_resid_post' from --hook)",
      "omit --cache"]),
    ("cache for another context length", ["--cache", "{cache}", "--context-length", "64"],
     ["--cache", "context_length 32 (not 64 from --context-length)"]),
    ("cache for another model", ["--cache", "{cache}", "--model", "{data}/other_model"],
     ["--cache", "from --model)"]),
    ("batch larger than given cache", ["--cache", "{cache}", "--batch-size", "4096",
                                       "--total-tokens", "8192"],
     ["--batch-size 4096", "tokens", "{cache}"]),
    ("cache folder without manifest", ["--cache", "{data}/empty_folder"],
     ["--cache {data}/empty_folder holds no manifest.json", "omit --cache"]),
]


@pytest.mark.parametrize("extra, phrases", [c[1:] for c in SEARCH_CASES],
                         ids=[c[0] for c in SEARCH_CASES])
def test_bad_search_input_exits_2_and_writes_nothing(extra, phrases, tiny_model_dir, small_cache,
                                                     data, tmp_path, capsys):
    fill = {"tmp": str(tmp_path), "data": str(data), "cache": str(small_cache)}
    extra = [e.format(**fill) for e in extra]
    watched = [default_cache_root(), small_cache.parent, data]
    before = _tree(*watched)
    assert cli.main(["search", *(_base(tiny_model_dir, tmp_path) + extra)]) == 2
    line = _error_line(capsys)
    for phrase in phrases:
        assert phrase.format(**fill) in line, (phrase, line)
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()
    assert _tree(*watched) == before


SWEEP_CASES = [
    ("negative lambda", ["--lambdas", "0.1", "-0.5"], ["--lambdas -0.5", ">= 0"]),
    ("p <= 0", ["--exponents", "1", "0"], ["--exponents 0", "(0, 2]"]),
    ("p > 2", ["--exponents", "2.5"], ["--exponents 2.5", "(0, 2]"]),
]


@pytest.mark.parametrize("extra, phrases", [c[1:] for c in SWEEP_CASES],
                         ids=[c[0] for c in SWEEP_CASES])
def test_bad_sweep_input(extra, phrases, tiny_model_dir, tmp_path, capsys):
    argv = [a for a in _base(tiny_model_dir, tmp_path)
            if a not in ("--targets", "8", "--num-trials", "1")]
    assert cli.main(["sweep", *(argv + extra)]) == 2
    line = _error_line(capsys)
    assert all(p in line for p in phrases), line
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()


@pytest.mark.parametrize("script, extra, phrase", [
    ("exponent_search.py", ["--power-p-range", "0", "1"], "--power-p-range LOW = 0"),
    ("l1_sweep.py", ["--model", "EleutherAI/pythia-70m-deduped"], "HF_HUB_OFFLINE"),
])
def test_scripts_exit_2_before_ray_starts(script, extra, phrase, tiny_model_dir, tmp_path):
    argv = [a for a in _base(tiny_model_dir, tmp_path)
            if a not in ("--targets", "8", "--num-trials", "1")]
    env = {**os.environ, "RAY_ADDRESS": "", "RAYSAE_RAY_ADDRESS": "", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "searches" / script), *argv, *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], lines
    assert lines[0].startswith(("raysae search: error: ", "raysae sweep: error: ")), lines
    assert "Ray" not in out.stdout  # failed before Ray started
    assert not (tmp_path / "results").exists() and not (tmp_path / "tune").exists()


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_ablation_cli_refuses_broken_sae(damage, tmp_path, capsys, monkeypatch):
    from raysae.core.config import SAEConfig
    from raysae.core.sae import SAE

    monkeypatch.chdir(tmp_path)
    path = SAE(SAEConfig(32, 128)).save(tmp_path / "sae")
    weights = path / "sae_weights.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        weights.write_bytes(pickle.dumps(_Payload()))
    assert cli.main(["ablation", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("raysae ablation: error: ") and "sae_weights.safetensors" in line
    assert "unreadable" in line and "re-save or re-train" in line
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert not (tmp_path / "PWNED").exists()  # loading never executed the payload


def test_ablation_cli_refuses_truncated_config(tmp_path, capsys):
    from raysae.core.config import SAEConfig
    from raysae.core.sae import SAE

    path = SAE(SAEConfig(32, 128)).save(tmp_path / "sae")
    text = (path / "cfg.json").read_text()
    (path / "cfg.json").write_text(text[: len(text) // 3])
    assert cli.main(["ablation", str(path)]) == 2
    assert "cfg.json is not valid JSON" in _error_line(capsys)
    assert not (path / "ablation").exists()
    json.loads(text)  # the original was valid: the truncation is what was refused


BUG = """
import sys
import raysae.cli.report
from raysae.cli import main

def boom(args):
    raise ValueError("an internal bug, not bad input")

raysae.cli.report.report_command = boom
sys.exit(main(["report", sys.argv[1]]))
"""


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(tmp_path):
    """Only a UserError becomes one line and exit 2; a ValueError raised by a bug inside a
    command keeps its traceback and exits 1 (issue #36)."""
    bug = subprocess.run([sys.executable, "-c", BUG, str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert bug.returncode == 1, bug.stderr[-2000:]
    assert "Traceback (most recent call last)" in bug.stderr
    assert bug.stderr.strip().splitlines()[-1] == "ValueError: an internal bug, not bad input"
    user = subprocess.run([sys.executable, "-m", "raysae", "report", str(tmp_path / "none")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert user.returncode == 2
    assert user.stderr.strip().splitlines() == [
        f"raysae report: error: {tmp_path / 'none' / 'trials.parquet'} not found; point at a "
        "folder written by a search"], user.stderr
