"""Every kind trains as it did when its record was made (tests/kind_records.py): the saved
tensors of each ladder member, its final lambda and its logged metrics, to float tolerance.
A refactor of kinds, ladder or step that changes any kind's results fails here."""

import json

import pytest
import torch
from kind_records import CASES, METRICS, TENSORS, pinned_run
from safetensors.torch import load_file

RECORDED = load_file(str(TENSORS))
RECORDED_METRICS = json.loads(METRICS.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every case trained now, with the math pinned as when recorded (kind_records)."""
    folder = tmp_path_factory.mktemp("kind_records")
    pinned_run(folder / "kinds.safetensors", folder / "kinds.json")
    return (load_file(str(folder / "kinds.safetensors")),
            json.loads((folder / "kinds.json").read_text()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_kind_trains_as_recorded(case, trained):
    all_tensors, all_metrics = trained
    tensors = {k: v for k, v in all_tensors.items() if k.startswith(case + "/")}
    metrics = all_metrics[case]
    want = {k: v for k, v in RECORDED.items() if k.startswith(case + "/")}
    assert sorted(tensors) == sorted(want), "the saved tensor set changed"
    for name, value in want.items():
        torch.testing.assert_close(tensors[name], value, rtol=2e-4, atol=2e-5, msg=name)
    for member, rec in RECORDED_METRICS[case].items():
        got = metrics[member]
        assert (got["status"], got["architecture"], got["k"]) == (
            rec["status"], rec["architecture"], rec["k"])
        assert got["lam"] == pytest.approx(rec["lam"], rel=2e-4, abs=1e-9)
        assert len(got["history"]) == len(rec["history"])
        for row, want_row in zip(got["history"], rec["history"], strict=True):
            assert set(row) == set(want_row)
            for key, value in want_row.items():
                assert row[key] == pytest.approx(value, rel=2e-4, abs=2e-5), (member, key)


def test_records_cover_every_built_in_kind():
    from raysae.core.kinds import KINDS

    recorded = {json.loads(METRICS.read_text())[c]["0"]["architecture"] for c in CASES}
    kinds = {CASES[c].get("kind", "relu") for c in CASES}
    assert {"relu", "panneal", "topk", "batchtopk", "jumprelu", "matryoshka"} <= kinds
    assert kinds <= set(KINDS) and recorded
