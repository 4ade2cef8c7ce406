"""The collapse threshold: its calibration sets, the committed tau and how the eval reads it."""

import json

import pytest
import torch

from evals import calibrate
from evals.calibrate import (calibration_path, collapse_spreads, collapse_tau, merge_collapse, near_copies,
                             shifted_copies, tone_families, tone_groups)


@pytest.fixture(scope="module")
def committed():
    return json.loads(calibration_path(32).read_text())["collapse"]


def test_near_copies_are_noisy_repeats_in_a_row():
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    copies = near_copies(images, k=4, sigma=0.03, seed=0)
    assert copies.shape == (12, 3, 8, 8)
    diff = copies - images.repeat_interleave(4, dim=0)
    assert 0.02 < float(diff.std()) < 0.035 and float(diff.abs().max()) < 0.2  # sigma 0.03 (clamping trims a little)
    assert not torch.equal(copies[0], copies[1])  # each copy its own noise


def test_shifted_copies_move_by_at_most_one_pixel():
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 2, 3] = 1.0
    copies = shifted_copies(image, k=16, shift=1, seed=0)
    spots = [tuple(torch.nonzero(c[0])[0].tolist()) for c in copies]
    assert all(abs(y - 2) <= 1 and abs(x - 3) <= 1 for y, x in spots)
    assert len(set(spots)) > 3  # the offsets are drawn per copy


def test_tone_families_strip_skin_tone_modifiers():
    emoji = ["👍", "👍🏻", "x", "👍🏿", "🧑‍🚒", "🧑🏽‍🚒", "👍🏽"]
    assert tone_families(emoji, k=2) == [[0, 1, 3, 6], [4, 5]]
    assert tone_families(emoji, k=3) == [[0, 1, 3, 6]]
    groups = tone_groups([[0, 1, 3, 6], [10, 11, 12, 13, 14]], count=6, k=4, seed=0)
    assert groups.shape == (6, 4)
    for row in groups.tolist():
        assert len(set(row)) == 4 and (set(row) <= {0, 1, 3, 6} or set(row) <= {10, 11, 12, 13, 14})


def test_collapse_tau_reads_the_committed_calibration(committed):
    assert collapse_tau("effnet-lite0", 128) == committed["tau"] > 0
    assert collapse_tau("effnet-lite0", 128, k=committed["k"]) == committed["tau"]
    assert collapse_tau("inception", 128) is None
    assert collapse_tau("effnet-lite0", 224) is None
    assert collapse_tau("effnet-lite0", 128, k=committed["k"] + 1) is None
    assert collapse_tau("effnet-lite0", 128, image_size=48) is None  # no calibration file for that size


def test_collapse_tau_is_none_without_a_collapse_block(tmp_path, monkeypatch):
    path = tmp_path / "calibration_32px.json"
    path.write_text(json.dumps({"rows": {}}))
    monkeypatch.setattr(calibrate, "calibration_path", lambda size: path)
    assert collapse_tau("effnet-lite0", 128) is None


def test_merge_keeps_every_other_key(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(calibration_path(32).read_text())
    before = json.loads(path.read_text())
    merge_collapse(path, {"tau": 1.5})
    after = json.loads(path.read_text())
    assert after.pop("collapse") == {"tau": 1.5}
    before.pop("collapse", None)
    assert after == before


def test_committed_tau_separates_its_own_sets(committed):
    rates, spreads = committed["rates"], committed["spreads"]
    assert rates["near_copies"] >= 0.95 and rates["tone_variants"] <= 0.1 and rates["distinct"] == 0.0
    assert spreads["near_copies"]["p95"] < committed["tau"] < spreads["tone_variants"]["p25"]
    assert (committed["feature_net"], committed["feature_resolution"], committed["k"]) == ("effnet-lite0", 128, 4)


def test_fresh_sample_under_the_committed_tau(committed):
    """40 groups per set drawn with another seed: the committed tau still tells the sets apart."""
    spreads = collapse_spreads(size=32, seed=1, groups=40)
    rate = {key: float((s < committed["tau"]).double().mean()) for key, s in spreads.items()}
    assert rate["distinct"] == 0.0
    assert rate["near_copies"] >= 0.9
    assert rate["tone_variants"] <= 0.15
    assert float(spreads["near_copies"].median()) < committed["tau"] < float(spreads["tone_variants"].median())


def test_collapse_vs_teacher_pairs_prompts_with_the_teachers_own_spread():
    import torch

    from evals.metrics import collapse_vs_teacher

    teacher = torch.tensor([2.0, 10.0, 20.0, 30.0])  # a prompt the teacher answers with one image has spread ~2
    assert collapse_vs_teacher(teacher, teacher) == 0.0  # the teacher against itself: 0 by construction
    assert collapse_vs_teacher(torch.zeros(4), teacher) == 1.0  # one image for every seed: every prompt collapsed
    assert collapse_vs_teacher(torch.tensor([1.5, 4.0, 15.0, 14.0]), teacher) == 0.5  # 4 < 5 and 14 < 15
    with pytest.raises(ValueError, match="must match"):
        collapse_vs_teacher(torch.zeros(3), teacher)
