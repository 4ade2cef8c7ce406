"""distill.probe (KID, BestKeeper), distill.watch through the engine, and the held-out split of distill.latents."""

import json
import math

import pytest
import torch
from torchmetrics.image.kid import poly_mmd

from distill import engine
from distill.config import TrainConfig
from distill.errors import ConfigError
from distill.latents import holdout_split
from distill.method import Method
from distill.probe import BestKeeper, kid


def test_kid_on_the_whole_set_is_torchmetrics_poly_mmd_and_separates_distributions():
    g = torch.Generator().manual_seed(0)
    real, same, shifted = (torch.randn(300, 16, generator=g, dtype=torch.float64) for _ in range(3))
    shifted = shifted + 0.5
    assert kid(real, same, subsets=1) == pytest.approx(float(poly_mmd(real, same)), rel=1e-9)
    assert abs(kid(real, same, subsets=20, subset_size=100)) < 0.02
    assert kid(real, shifted, subsets=20, subset_size=100) > 0.1
    assert kid(real, same, subsets=5, seed=1) == kid(real, same, subsets=5, seed=1)  # a repeated probe repeats


def test_best_keeper_keeps_the_better_step_when_fed_a_worse_one_and_sees_the_plateau():
    keeper = BestKeeper(patience=2)
    assert keeper.record(10, 5.0) is True
    assert keeper.record(20, 3.0) is True
    assert keeper.record(30, 4.0) is False  # worse: the best stays at step 20
    assert keeper.best["step"] == 20 and not keeper.plateaued()
    assert keeper.record(40, 3.0) is False  # a tie is not an improvement
    assert keeper.plateaued() and [h["step"] for h in keeper.since_best()] == [30, 40]
    assert keeper.record(50, float("nan")) is False and keeper.best["step"] == 20
    assert keeper.record(60, 1.0) is True and not keeper.plateaued()


def test_best_keeper_reload_drops_probes_after_the_resumed_step(tmp_path):
    keeper = BestKeeper(patience=3)
    for step, score in [(10, 4.0), (20, 2.0), (30, 1.0)]:
        keeper.record(step, score, holdout_loss=0.1)
    keeper.save(tmp_path / "probe.jsonl")
    again = BestKeeper.load(tmp_path / "probe.jsonl", patience=3, upto=25)
    assert [h["step"] for h in again.history] == [10, 20] and again.best["score"] == 2.0
    assert again.history[0]["holdout_loss"] == 0.1


def test_holdout_split_is_disjoint_complete_and_the_same_for_every_run():
    train, held = holdout_split(100, 10)  # a tenth: the most it holds out
    assert len(held) == 10 and len(train) == 90
    assert sorted(train.tolist() + held.tolist()) == list(range(100))
    assert torch.equal(held, holdout_split(100, 10)[1])
    assert len(holdout_split(100, 0)[1]) == 0
    with pytest.raises(ConfigError, match="holdout_rows=11 would hold out more than a tenth of the 100 rows"):
        holdout_split(100, 11)
    with pytest.raises(ConfigError, match="holdout_rows=0 and probe.every_steps=0"):
        holdout_split(4, 1)


class Probed(Method):
    """A one-weight method whose probe scores are scripted; save_student writes the step it saved."""

    name = "probed"

    def __init__(self, scores):
        super().__init__()
        self.modules["student"] = torch.nn.Linear(1, 1)
        self.optimizers["student"] = torch.optim.SGD(self.student.parameters(), lr=0.1)
        self.scores = dict(scores)

    def batch(self, generator):
        return torch.randn(4, 1, generator=generator)

    def step(self, batch, iteration, generator):
        return {"loss": self.student(batch).pow(2).mean()}

    def probe(self, step):
        return {"score": self.scores[step], "holdout_loss": step / 100}

    def save_student(self, folder, step):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "step.txt").write_text(str(step))


def _fit(tmp_path, scores, steps, **loop):
    run = engine.start_run(TrainConfig(recipe="probed", run_name="probed", output_dir=str(tmp_path), report_to="none"))
    loop = engine.Loop(max_steps=steps, probe_every=2, checkpointing_steps=0, **loop)
    return run.dir, engine.fit(run, Probed(scores), loop)


def test_the_engine_keeps_the_best_probed_student_and_says_when_quality_stopped(tmp_path, capsys):
    folder, report = _fit(tmp_path, {0: 5.0, 2: 3.0, 4: 1.0, 6: 2.0, 8: 1.5, 10: 1.2}, 10, probe_patience=3)
    assert (folder / "best" / "step.txt").read_text() == "4"  # not the later, worse ones
    assert (folder / "student" / "step.txt").read_text() == "10"
    assert report["steps"] == 10 and report["probe"]["best_step"] == 4 and report["probe"]["plateau"]
    rows = [json.loads(line) for line in (folder / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6, 8, 10] and rows[2]["holdout_loss"] == 0.04  # 0: untrained
    assert all(r["minutes"] >= 0 for r in rows) and (folder / "probe.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "quality stopped improving: the best probe score 1 was at step 4" in out and "training goes on" in out
    assert not list(folder.glob("best.*"))  # no partial or old copy left


def test_stop_on_plateau_ends_the_run_early_and_says_why(tmp_path, capsys):
    folder, report = _fit(tmp_path, {0: 9.0, 2: 1.0, 4: 2.0, 6: 3.0, 8: 0.5}, 8, probe_patience=2, probe_stop=True)
    assert report["steps"] == 6 and (folder / "best" / "step.txt").read_text() == "2"
    assert "probe.stop_on_plateau) stopped it at step 6 of 8" in capsys.readouterr().out
    assert math.isclose(report["probe"]["best_score"], 1.0)
