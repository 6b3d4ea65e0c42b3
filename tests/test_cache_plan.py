"""The cache's rows against the SAEs' training (raysae/search/cache_plan.py): the pythia-70m
preset's plan reads each row once, a smaller cache is reported as read several times, and
the held-out text the SAEs are scored on is never among the cache's training rows."""

import pyarrow as pa
import pyarrow.parquet as pq

from raysae.lm import corpus
from raysae.search.cache_plan import cache_bytes, cache_rows, passes_over_cache
from raysae.search.config import job_config
from raysae.search.job import prepare_activations


def test_the_pythia_preset_reads_each_row_once():
    cfg = job_config("pythia-70m")
    assert passes_over_cache(cfg) == 1.0
    assert cache_rows(cfg) == cfg.train.total_tokens == 400_000_000
    # 400M float16 rows of 512 plus their metadata: what the GPU worker's NVMe must hold
    assert 409.6e9 < cache_bytes(cfg, 512) < 412e9
    assert passes_over_cache(job_config("local")) == 1.0


def test_a_cache_smaller_than_the_budget_is_read_several_times():
    assert passes_over_cache(job_config("pythia-70m", cache_tokens=50_000_000)) == 8.0
    cfg = job_config("local", total_tokens=1_000_000, cache_tokens=500_000)
    assert passes_over_cache(cfg) == 2.0
    assert passes_over_cache(cfg, rows=250_000) == 4.0  # a given --cache of 250k rows


def test_the_budget_check_grows_the_cache_to_its_longer_training():
    cfg = job_config("pythia-70m", budget_check=2.0)
    assert cache_rows(cfg) == 800_000_000 and passes_over_cache(cfg) == 1.0


def test_streaming_reads_no_cache():
    assert passes_over_cache(job_config("local", live=True)) is None


def test_the_preset_caches_training_text_only():
    """The cache the cluster's nodes build harvests the corpus's train split; held-out CE
    reads the held-out split (corpus.heldout_blocks)."""
    cfg = job_config("pythia-70m")
    _, source = prepare_activations(cfg, cfg.model.model, on_cluster=True)
    assert source["split"] == "train" and source["n_tokens"] == 400_000_000


def test_train_and_heldout_rows_of_a_table_corpus_are_disjoint(tmp_path):
    """A table corpus (as the Pile is, read from the hub) is split by a hash of each row's
    index: every row is in exactly one split, about 10% held out."""
    rows, path = 1000, tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": [f"document number {i}" for i in range(rows)]}), path)
    train = list(corpus.iter_texts(str(path), split="train"))
    held = list(corpus.iter_texts(str(path), split="heldout"))
    assert set(train).isdisjoint(held)
    assert len(train) + len(held) == rows
    assert 0.05 * rows < len(held) < 0.15 * rows
