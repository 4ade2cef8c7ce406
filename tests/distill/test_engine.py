"""distill.engine with a toy method of two networks and two optimizers (a GAN-shaped two-time-scale update).

The critic steps on every iteration, the generator on every second one; an EMA of the generator is a third,
untrained module. The checks: the right optimizer steps on the right iterations, only the intended module moves,
every module / optimizer / RNG state survives a checkpoint, and a resumed run equals an uninterrupted one exactly.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distill import engine, optim
from distill.budget import Budget
from distill.config import TrainConfig
from distill.ema import ema_update_
from distill.errors import ConfigError
from distill.method import Method
from distill.runs import list_checkpoints, read_state


class ToyGan(Method):
    name = "toy"

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.modules["generator"] = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(dropout))
        self.modules["critic"] = torch.nn.Linear(4, 1)
        self.modules["ema"] = torch.nn.Linear(4, 4).requires_grad_(False)
        self.optimizers["generator"] = torch.optim.AdamW(self.generator.parameters(), lr=1e-2)
        self.optimizers["critic"] = torch.optim.AdamW(self.critic.parameters(), lr=1e-2)
        self.calls = []

    def optimizers_to_step(self, iteration):
        return ["critic", "generator"] if iteration % 2 else ["critic"]

    def batch(self, generator):
        return torch.randn(8, 4, generator=generator)

    def step(self, batch, iteration, generator):
        self.calls.append((iteration, tuple(self.optimizers_to_step(iteration))))
        fake = self.generator(batch)  # dropout draws from the global RNG: resume must restore it
        real = batch + 1.0
        critic = (self.critic(fake) - self.critic(real)).mean()  # not detached: its gradient reaches the generator too
        out = {"critic": critic, "real_score": self.critic(real).mean().detach()}
        if "generator" in self.optimizers_to_step(iteration):
            out["generator"] = -self.critic(fake).mean()
        return out

    def after_step(self, iteration, stepped):
        if "generator" in stepped:
            ema_update_(self.ema, self.generator[0], 0.9)


def _cfg(tmp_path, **over):
    values = dict(recipe="toy", run_name="toy", output_dir=str(tmp_path / "runs"), report_to="none", seed=3)
    return TrainConfig(**{**values, **over})


def _loop(steps, **over):
    return engine.Loop(**{"max_steps": steps, "batch_size": 8, "checkpointing_steps": 2, **over})


def _train(tmp_path, steps, method=None, **cfg):
    run = engine.start_run(_cfg(tmp_path, **cfg))
    method = method or ToyGan()
    report = engine.fit(run, method, _loop(steps))
    return run.dir, method, report


def _tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_optimizer_steps_on_its_iterations_and_only_its_module_moves(tmp_path):
    torch.manual_seed(0)
    method = ToyGan(dropout=0.0)
    run = engine.start_run(_cfg(tmp_path))
    before = {name: _tensors(method.modules[name]) for name in ("generator", "critic", "ema")}
    engine.fit(run, method, _loop(1, checkpointing_steps=0))  # iteration 0: the critic's optimizer alone steps,
    # although the critic loss also sends a gradient into the generator
    after = {name: _tensors(method.modules[name]) for name in ("generator", "critic", "ema")}
    assert any(not torch.equal(before["critic"][k], after["critic"][k]) for k in after["critic"])
    assert all(torch.equal(before["generator"][k], after["generator"][k]) for k in after["generator"])
    assert all(torch.equal(before["ema"][k], after["ema"][k]) for k in after["ema"])
    assert method.calls == [(0, ("critic",))]
    assert all(p.grad is None for opt in method.optimizers.values() for g in opt.param_groups for p in g["params"])


def test_generator_iterations_step_both_and_update_the_ema(tmp_path):
    torch.manual_seed(0)
    run_dir, method, report = _train(tmp_path, 4)
    assert [c[1] for c in method.calls] == [("critic",), ("critic", "generator")] * 2
    assert method.optimizers["generator"].optimizer.state[method.generator[0].weight]["step"] == 2
    assert method.optimizers["critic"].optimizer.state[method.critic.weight]["step"] == 4
    assert report["steps"] == 4 and set(report["losses"]) == {"critic", "real_score", "generator"}
    assert report["loss_first_50"] == report["losses"]["critic"]["first_50"]  # no "loss": the first one leads
    assert json.loads((run_dir / "report.json").read_text())["steps_this_session"] == 4


def test_a_checkpoint_holds_every_module_in_its_format_and_the_trainer_state(tmp_path):
    torch.manual_seed(0)
    run_dir, method, _ = _train(tmp_path, 4)
    checkpoint = list_checkpoints(run_dir)[-1]
    assert read_state(checkpoint)["step"] == 4
    for name in ("generator", "critic", "ema"):
        saved = load_file(str(checkpoint / "modules" / name / "model.safetensors"))
        live = method.modules[name].state_dict()
        assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    names = {p.name for p in checkpoint.iterdir()}
    assert {"optimizer.bin", "optimizer_1.bin", "random_states_0.pkl", "trainer_state.json"} <= names


def test_resumed_run_equals_the_uninterrupted_one_exactly(tmp_path):
    torch.manual_seed(0)
    _, straight, _ = _train(tmp_path / "a", 6)
    torch.manual_seed(0)
    first, _, _ = _train(tmp_path / "b", 3)
    torch.manual_seed(0)
    resumed_dir, resumed, report = _train(tmp_path / "b", 6, resume_from_checkpoint="latest")
    assert resumed_dir == first and report["steps_this_session"] == 3  # from the final step-3 checkpoint
    for name in ("generator", "critic", "ema"):
        a, b = straight.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("generator", "critic"):
        sa, sb = straight.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa), name


def test_a_checkpoint_without_a_module_the_run_needs_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    run_dir, _, _ = _train(tmp_path, 2)
    checkpoint = list_checkpoints(run_dir)[-1]
    for path in (checkpoint / "modules" / "ema").iterdir():
        path.unlink()
    (checkpoint / "modules" / "ema").rmdir()
    with pytest.raises(ConfigError, match="no module 'ema'"):
        _train(tmp_path, 4, resume_from_checkpoint=str(checkpoint))


def test_eight_bit_adam_needs_cuda_and_bitsandbytes():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        optim.make_optimizer(params, 1e-4, use_8bit=True, device="cpu")
    assert isinstance(optim.make_optimizer(params, 1e-4), torch.optim.AdamW)


def test_ema_update_schedule_and_step_generators():
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.95 * t.detach() + 0.05 * o.detach() for t, o in zip(target.parameters(), online.parameters())]
    ema_update_(target, online, 0.95)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)
    assert optim.lr_multiplier("constant", 10, 0.04, 4) == pytest.approx(0.5)
    assert optim.lr_multiplier("constant", 10, 0.5, 50) == pytest.approx(1.0)
    assert optim.lr_multiplier("cosine", 0, 0.5, 50) == pytest.approx(0.5)
    assert optim.lr_multiplier("cosine", 0, 1.0, 50, floor=0.05) == pytest.approx(0.05)
    a, b = engine.step_generator(0, 5), engine.step_generator(0, 5)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))
    assert not torch.equal(torch.rand(3, generator=engine.step_generator(0, 5)),
                           torch.rand(3, generator=engine.step_generator(0, 6)))
    # 2 processes without accumulation draw the micro-batches of 1 process accumulating 2, and no two coincide
    two_procs = [engine.micro_batch_index(s, 0, 1, p, 2) for s in range(3) for p in range(2)]
    one_proc = [engine.micro_batch_index(s, m, 2, 0, 1) for s in range(3) for m in range(2)]
    assert two_procs == one_proc == list(range(6))


def test_eta_names_the_binding_budget(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("distill.budget.time.monotonic", lambda: clock[0])
    budget = Budget(1000, 2.0)  # 1,000 steps or 2 minutes
    clock[0] += 30.0  # 10 steps in 30 s: the minutes bind, at ~40 steps
    seconds, final, binding = budget.eta(10)
    assert binding == "minutes" and seconds == pytest.approx(90.0) and final == 40
    fast = Budget(100, 60.0)
    clock[0] += 10.0
    assert fast.eta(50) == (pytest.approx(10.0), 100, "steps")


class NanAt(ToyGan):
    """The critic's loss turns NaN at iteration `at`."""

    def __init__(self, at):
        super().__init__(dropout=0.0)
        self.at = at

    def step(self, batch, iteration, generator):
        out = super().step(batch, iteration, generator)
        if iteration == self.at:
            out["critic"] = self.fault(out["critic"])
        return out

    def fault(self, loss):
        return loss * float("nan")


def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    from distill.errors import TrainingStopped

    torch.manual_seed(0)
    run = engine.start_run(_cfg(tmp_path))
    with pytest.raises(TrainingStopped, match=r"step 5: the critic loss is nan .*on_nonfinite=skip.*; the last good checkpoint is .*step-0000004"):
        engine.fit(run, NanAt(4), _loop(8))
    assert [c.name for c in list_checkpoints(run.dir)] == ["step-0000002", "step-0000004"]  # nothing written after


def test_gradient_norms_are_logged_per_optimizer_but_not_summarised_as_losses(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(engine, "_log", lambda acc, method, stage, values, step: logged.append(dict(values)))
    torch.manual_seed(0)
    _, _, report = _train(tmp_path, 2)
    assert logged[0]["grad_norm_critic"] > 0 and "grad_norm_generator" not in logged[0]  # it did not step then
    assert "grad_norm_generator" in logged[1]  # (zero here: the toy's two losses cancel in the generator)
    assert not any(k.startswith("grad_norm") for k in report["losses"])


def test_on_nonfinite_skip_skips_the_step_counts_it_and_goes_on(tmp_path):
    torch.manual_seed(0)
    method = NanAt(4)
    report = engine.fit(engine.start_run(_cfg(tmp_path)), method, _loop(8, on_nonfinite="skip"))
    assert report["steps"] == 8 and report["skipped_nonfinite"] == 1
    assert math.isfinite(report["losses"]["critic"]["first_50"])
    assert method.optimizers["critic"].optimizer.state[method.critic.weight]["step"] == 7  # 8 iterations, one skipped
    assert all(torch.isfinite(p).all() for p in method.critic.parameters())


class InfGradientAt(NanAt):
    """At iteration `at` the critic's loss stays finite (0 added) but its gradient is inf (d sqrt(x)/dx at 0)."""

    def fault(self, loss):
        w = self.critic.weight.sum()
        return loss + (w - w.detach()).clamp(min=0).sqrt()


def test_an_infinite_gradient_with_a_finite_loss_stops_the_run_naming_the_optimizer(tmp_path):
    from distill.errors import TrainingStopped

    torch.manual_seed(0)
    run = engine.start_run(_cfg(tmp_path))
    method = InfGradientAt(2)
    before = _tensors(method.critic)
    with pytest.raises(TrainingStopped, match=r"step 3: the gradient of the critic optimizer's parameters is (inf|nan)"):
        engine.fit(run, method, _loop(8, checkpointing_steps=0))
    assert all(torch.isfinite(v).all() for v in _tensors(method.critic).values())  # the bad update never happened
    assert any(not torch.equal(before[k], v) for k, v in _tensors(method.critic).items())  # the good ones did


def test_the_learning_rate_schedule_follows_steps_and_a_time_limit_only_cuts_it(tmp_path, monkeypatch, capsys):
    logged = []
    monkeypatch.setattr(engine, "_log", lambda acc, method, stage, values, step: logged.append(
        method.optimizers["critic"].param_groups[0]["lr"]))
    torch.manual_seed(0)
    run = engine.start_run(_cfg(tmp_path))
    loop = _loop(100, checkpointing_steps=0, lr_schedule="cosine", max_minutes=0.002)  # 0.12 s: a few 50 ms steps
    report = engine.fit(run, Sleepy(), loop)
    n = report["steps"]
    assert 1 <= n < 100
    # by steps: step k of a 100-step cosine, whatever the clock says (by time the rate would be near its floor)
    assert logged == [pytest.approx(1e-2 * optim.lr_multiplier("cosine", 0, k / 100, k)) for k in range(n)]
    assert f"stopped it at step {n} of 100: the learning-rate schedule was cut" in capsys.readouterr().out


class Sleepy(ToyGan):
    def step(self, batch, iteration, generator):
        import time

        time.sleep(0.05)
        return super().step(batch, iteration, generator)


class SignalAt(ToyGan):
    """Sends itself `signals` (e.g. SIGTERM) during iteration `at`, as a scheduler reclaiming the machine would."""

    def __init__(self, at, *signals):
        super().__init__(dropout=0.0)
        self.at, self.signals = at, signals

    def step(self, batch, iteration, generator):
        import os

        if iteration == self.at:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
        return super().step(batch, iteration, generator)


def test_sigterm_checkpoints_at_the_step_boundary_exits_0_and_the_resume_equals_a_straight_run(tmp_path, capsys):
    import signal

    straight_run = engine.start_run(_cfg(tmp_path / "a"))  # seeds the global RNG: models are built after it
    straight = ToyGan(dropout=0.0)
    engine.fit(straight_run, straight, _loop(6, checkpointing_steps=0))
    run = engine.start_run(_cfg(tmp_path / "b"))
    with pytest.raises(SystemExit) as stopped:
        engine.fit(run, SignalAt(2, signal.SIGTERM), _loop(6, checkpointing_steps=0))
    assert stopped.value.code == 0
    assert [c.name for c in list_checkpoints(run.dir)] == ["step-0000003"]  # the step under way finished first
    assert f"distill train --resume {run.dir}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    torch.manual_seed(0)
    _, resumed, _ = _train(tmp_path / "b", 6, method=ToyGan(dropout=0.0), resume_from_checkpoint=str(run.dir))
    for name in ("generator", "critic", "ema"):
        a, b = straight.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_second_sigint_stops_at_once_and_leaves_the_last_checkpoint_loadable(tmp_path):
    import signal

    torch.manual_seed(0)
    run = engine.start_run(_cfg(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        engine.fit(run, SignalAt(3, signal.SIGINT, signal.SIGINT), _loop(8))
    assert [c.name for c in list_checkpoints(run.dir)] == ["step-0000002"]
    assert not list((run.dir / "checkpoints").glob("*.partial"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_resume_with_other_training_settings_is_refused_unless_allowed_and_then_recorded(tmp_path):
    torch.manual_seed(0)
    run_dir, _, _ = _train(tmp_path, 2)
    original = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"learning_rate: 0.0001 -> 0.001.*allow_config_change=true"):
        _train(tmp_path, 4, resume_from_checkpoint=str(run_dir), learning_rate=1e-3)
    _train(tmp_path, 4, resume_from_checkpoint=str(run_dir), checkpointing_steps=7)  # where/when to write: free
    _train(tmp_path, 4, resume_from_checkpoint=str(run_dir), learning_rate=1e-3, allow_config_change=True)
    assert (run_dir / "config.yaml").read_text() == original  # what the run was started with, never rewritten
    recorded = (run_dir / "config.resumed-at-step-4.yaml").read_text()
    assert recorded.startswith("# changed: learning_rate: 0.0001 -> 0.001") and "learning_rate: 0.001" in recorded


def test_a_start_that_fails_before_training_leaves_no_run_folder(tmp_path):
    from distill.errors import ModelError

    with pytest.raises(ModelError):
        with engine.start_run(_cfg(tmp_path)) as run:
            assert run.dir.is_dir()
            raise ModelError("the teacher is not there")
    assert not run.dir.exists()
    torch.manual_seed(0)
    with pytest.raises(Exception):
        with engine.start_run(_cfg(tmp_path)) as run:
            engine.fit(run, NanAt(1), _loop(8))  # trained a step, then failed: its logs and folder stay
    assert run.dir.is_dir()
