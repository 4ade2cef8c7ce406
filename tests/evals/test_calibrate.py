"""The calibrated ordering holds on a small sample of the real emoji (N = 200 per side, 32 px)."""

import pytest

from evals.calibrate import calibrate, duplicate_rows, format_table


@pytest.fixture(scope="module")
def result():
    return calibrate(size=32, n=200, seed=0, with_retrieval=False)


def test_degradations_score_worse_than_the_real_floor(result):
    rows = result["rows"]
    for bad in ("noise", "blur", "duplicates"):
        assert rows["floor"]["FD-EffNet"] < rows[bad]["FD-EffNet"], bad
        assert rows["floor"]["KIDx1000"] < rows[bad]["KIDx1000"], bad
    assert rows["floor"]["FD-EffNet"] * 1.5 < min(rows["noise"]["FD-EffNet"], rows["blur"]["FD-EffNet"])


def test_duplicates_lower_recall_and_diversity(result):
    floor, dup = result["rows"]["floor"], result["rows"]["duplicates"]
    assert dup["recall"] < 0.8 * floor["recall"]  # at N = 200 each image is there only twice
    assert dup["diversity"] < 0.75 * floor["diversity"]  # groups of 4 hold 2 distinct images: ~2/3
    assert all(result["checks"].values()), format_table(result)


def test_protocol_is_recorded(result):
    p = result["protocol"]
    assert (p["feature_net"], p["n"], p["image_size"], p["seed"]) == ("effnet-lite0", 200, 32, 0)
    assert "torchmetrics" in p["versions"] and "FID" not in result["rows"]["floor"]


def test_duplicate_rows_repeat_in_runs():
    assert duplicate_rows(10, distinct=4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
