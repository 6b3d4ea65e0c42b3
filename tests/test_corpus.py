from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raysae.lm import corpus


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_stdlib_split_is_disjoint_and_deterministic():
    files = corpus.stdlib_files()
    train = corpus.split_files(files, "train")
    held = corpus.split_files(files, "heldout")
    assert set(train).isdisjoint(held)
    assert set(train) | set(held) == set(files)
    assert 0.05 < len(held) / len(files) < 0.2
    assert corpus.split_files(files, "heldout") == held
    with pytest.raises(ValueError, match="split"):
        corpus.split_files(files, "validation")


def test_stdlib_prefix_samples_the_whole_library():
    """A cache reads the stream's first tokens: in the fixed shuffled order
    (corpus.STDLIB_ORDER) the first tenth of the training files reaches every large package
    of the library (alphabetically it reached 1 of 9 here)."""
    import sysconfig
    from collections import Counter

    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus.stdlib_files()
    assert files == corpus.stdlib_files() and files != sorted(files)  # fixed, not alphabetical
    train = corpus.split_files(files, "train")
    counts = Counter(p.relative_to(root).parts[0] for p in train)
    large = {top for top, n in counts.items() if n >= 20}
    first = {p.relative_to(root).parts[0] for p in train[: len(train) // 10]}
    assert len(large) >= 5 and len(large & first) >= len(large) - 1


def test_blocks_are_packed_documents_with_bos(tok, tmp_path):
    docs = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n" * 3, "import os\n" * 5]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(d)
    files = [tmp_path / f"doc{i}.txt" for i in range(3)]
    blocks = corpus.token_blocks(files, tok, 8, split="all")
    assert blocks.dtype == np.int64 and blocks.shape[1] == 8
    assert np.all(blocks[:, 0] == tok.bos_token_id)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = blocks[:, 1:].reshape(-1)
    assert body.tolist() == stream[: len(body)]
    no_bos = corpus.token_blocks(files, tok, 8, split="all", prepend_bos=False, max_blocks=2)
    assert no_bos.shape == (2, 8) and no_bos.reshape(-1).tolist() == stream[:16]


def test_train_and_heldout_tokens_differ(tok):
    train = corpus.token_blocks(corpus.STDLIB, tok, 32, max_blocks=50)
    held = corpus.heldout_blocks(tok, 32, max_blocks=50)
    assert train.shape == held.shape == (50, 32)
    assert not np.array_equal(train, held)


def test_parquet_with_text_column(tok, tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame({"body": ["print('hello world')\n" * 20] * 30, "n": range(30)}).to_parquet(path)
    blocks = corpus.token_blocks(str(path), tok, 16, text_column="body", split="all")
    assert blocks.shape[1] == 16 and len(blocks) > 5
    train = corpus.token_blocks(str(path), tok, 16, text_column="body", split="train")
    assert len(train) < len(blocks)  # rows of the held-out split are left out
    with pytest.raises(ValueError, match="text_column='text' not in.*body"):
        corpus.token_blocks(str(path), tok, 16, split="all")


def test_empty_and_bad_sources(tok, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no full block"):
        corpus.token_blocks(str(tmp_path / "empty.txt"), tok, 16, split="all")
    with pytest.raises(ValueError, match="no local files"):
        corpus.token_blocks(str(tmp_path / "none*.txt"), tok, 16)
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes file kinds"):
        corpus.corpus_files(tmp_path)
    with pytest.raises(ValueError, match="context_length"):
        corpus.token_blocks(corpus.STDLIB, tok, 1)


def test_unreachable_hub_dataset_is_a_value_error(tok):
    with pytest.raises(ValueError, match="cannot open dataset"):
        corpus.token_blocks("no-such-org/no-such-dataset-raysae", tok, 16)


def _pile_like(root, docs_per_shard=40, shards=2):
    """A folder laid out as monology/pile-uncopyrighted on the hub: train/NN.jsonl.zst
    shards of {"text", "meta"} lines (zstandard, as the Pile's files)."""
    import json

    import zstandard

    texts = [f"def f{i}(x):\n    return x * {i}  # document {i}\n" * 8
             for i in range(docs_per_shard * shards)]
    (root / "train").mkdir(parents=True)
    for s in range(shards):
        lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": "Github"}}) + "\n"
                        for t in texts[s * docs_per_shard:(s + 1) * docs_per_shard])
        (root / "train" / f"{s:02d}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(lines.encode()))
    return texts


def test_pile_layout_jsonl_zst_through_the_hub_path(tok, tmp_path, monkeypatch):
    """The hub name's code path (load_dataset(name, streaming=True)) on a local folder laid
    out as the Pile's repo: the .jsonl.zst shards are decompressed and read as JSON rows."""
    texts = _pile_like(tmp_path / "pile")
    monkeypatch.setattr(corpus, "_is_local", lambda source: False)  # take the hub branch
    got = list(corpus.iter_texts(str(tmp_path / "pile"), split="all"))
    assert got == texts
    blocks = corpus.token_blocks(str(tmp_path / "pile"), tok, 16, split="train")
    assert blocks.shape[1] == 16 and len(blocks) > 10


def test_local_jsonl_zst_files_are_tables(tmp_path):
    texts = _pile_like(tmp_path / "pile")
    assert corpus._kind(tmp_path / "pile" / "train" / "00.jsonl.zst") == "json"
    assert list(corpus.iter_texts(str(tmp_path / "pile"), split="all")) == texts
