"""Speed numbers: positive, ordered by steps, stage by stage; the speedup and cost arithmetic."""

import pytest
import torch

from distill.memory import PeakMemory
from evals import models, speed


@pytest.fixture(scope="module")
def teacher(tiny_sd_path):
    usual, baseline = models.load_teacher(str(tiny_sd_path), "cpu", torch.float32, 1.0, None)
    return baseline


def test_latency_is_positive_split_by_stage_and_more_steps_are_slower(teacher):
    one = speed.latency(teacher, 1, "red heart", runs=5, warmup=1)
    eight = speed.latency(teacher, 8, "red heart", runs=5, warmup=1)
    for lat in (one, eight):
        assert 0 < lat["p50_ms"] <= lat["p95_ms"] and lat["runs"] == 5
        assert all(v > 0 for v in lat["stage_p50_ms"].values()) and lat["peak_mem_mb"] > 0
    # 8 UNet calls against 1: far outside timing noise, in the loop and end to end.
    assert eight["stage_p50_ms"]["loop"] > 3 * one["stage_p50_ms"]["loop"]
    assert eight["p50_ms"] > one["p50_ms"]


def test_stage_clock_leaves_the_first_and_a_short_last_batch_out():
    clock = speed.StageClock("cpu")
    for size, seconds in ((10, 5.0), (10, 1.0), (10, 1.0), (4, 3.0)):
        clock.start_batch(size)
        clock.batches[-1].update(text=0.0, loop=seconds, decode=0.0)
    s = clock.summary()
    assert s["images_timed"] == 20 and s["stage_ms_per_image"]["loop"] == pytest.approx(100.0)
    assert s["throughput_img_s"] == pytest.approx(10.0) and s["seconds"] == pytest.approx(10.0)
    assert s["loop_cv"] == 0.0  # the two timed batches took the same time
    clock.batches[2]["loop"] = 2.0
    assert clock.summary()["loop_cv"] == pytest.approx(0.4714, rel=1e-3)  # std 0.0707 / mean 0.15 (s per image)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        x = torch.ones(64, 2**20)  # 256 MiB, touched
        del x
    assert big.mb > small.mb + 200 and big.kind.startswith("process_peak_rss")


def test_percentile_is_nearest_rank():
    values = list(range(1, 21))  # 1..20
    assert speed.percentile(values, 50) == 10 and speed.percentile(values, 95) == 19
    assert speed.percentile([3.0], 95) == 3.0


def _row(nfe, p50, loop_b1, loop_b, throughput):
    return {"nfe": nfe, "speed": {"latency": {"p50_ms": p50, "stage_p50_ms": {"loop": loop_b1}},
                                  "stage_ms_per_image": {"loop": loop_b}, "throughput_img_s": throughput}}


def test_speedups_and_the_nfe_bar():
    teacher = _row(100, p50=1000.0, loop_b1=900.0, loop_b=700.0, throughput=1.4)
    student = _row(2, p50=40.0, loop_b1=20.0, loop_b=14.5, throughput=30.0)
    s = speed.speedups(student, teacher)
    assert s["nfe_ratio"] == 50 and s["latency"] == 25 and s["loop_batch1"] == 45
    assert s["throughput"] == pytest.approx(30 / 1.4)
    assert s["loop_batch"] == pytest.approx(700 / 14.5) and s["loop_within_10pct_of_nfe"]  # 48.3 vs 50
    slow = _row(2, p50=40.0, loop_b1=20.0, loop_b=20.0, throughput=30.0)
    assert not speed.speedups(slow, teacher)["loop_within_10pct_of_nfe"]  # 35 vs 50


def test_cost_per_million_images():
    assert speed.cost_per_million(1.0, 3.6) == pytest.approx(1000.0)  # 1e6 s = 277.8 h at 3.6 USD
    assert speed.cost_per_million(100.0, 2.0) == pytest.approx(1e6 / 100 / 3600 * 2)


def test_a_latency_time_cap_stops_after_the_minimum_runs_and_says_how_many_ran(teacher):
    capped = speed.latency(teacher, 2, "red heart", runs=20, warmup=0, budget_s=1e-9)
    assert capped["runs"] == speed.MIN_TIMED_RUNS  # every run takes longer than the cap: the minimum, then stop
    assert speed.latency(teacher, 1, "red heart", runs=7, warmup=0, budget_s=1e9)["runs"] == 7


def test_dtype_auto_is_bf16_only_where_the_cpu_has_it_natively(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.parse_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.parse_dtype("auto", "cpu") == torch.float32 and models.auto_dtype("mps") == "fp32"
    assert models.parse_dtype("fp32", "cpu") == torch.float32  # what the user names wins
