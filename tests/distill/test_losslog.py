import torch

from distill.losslog import LossLog, group_means


def test_group_means_average_within_each_group_present_and_name_it():
    values = torch.tensor([1.0, 3.0, 10.0, 5.0])
    groups = torch.tensor([0, 0, 2, 0])
    out = group_means(values, groups, {0: "interval/t099", 1: "interval/t199", 2: "interval/t299"})
    assert set(out) == {"interval/t099", "interval/t299"}  # no sample drew t = 199: nothing logged for it
    assert out["interval/t099"].item() == 3.0 and out["interval/t299"].item() == 10.0


def test_a_loss_logged_on_some_steps_only_is_summarised_over_those():
    log = LossLog()
    log.add({"loss": 1.0, "interval/t099": 2.0})
    log.add({"loss": 3.0})
    summary = log.summary()
    assert summary["loss_first_50"] == 2.0 and summary["losses"]["interval/t099"]["first_50"] == 2.0
