"""Sample-parallel denoising on a CPU: the same samples as one whole batch, and shares only where they pay."""

import pytest
import torch

from evals import cores, models

PROMPTS = ["grinning face", "red heart", "dog face", "banana"] * 4


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_batch_split_over_cores_gives_the_samples_of_the_whole_batch(tiny_sd_v_path, two_threads):
    usual, _ = models.load_teacher(str(tiny_sd_v_path), "cpu", torch.float32, 3.0, None)
    assert cores.workers(usual, cores.MIN_PER_CORE) == 2 and cores.workers(usual, cores.MIN_PER_CORE - 1) == 1
    cond = models.encode(usual, PROMPTS)
    gens = [models.sample_generators(0, range(len(PROMPTS))) for _ in range(2)]
    whole = models.denoise(usual, 3, cond, models.initial_noise(usual, gens[0]), gens[0])
    split = cores.denoise(usual, 3, cond, models.initial_noise(usual, gens[1]), gens[1], 2)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    assert torch.get_num_threads() == 2  # the workers' single thread does not stay behind


def test_one_thread_runs_batches_whole(tiny_sd_v_path):
    usual, _ = models.load_teacher(str(tiny_sd_v_path), "cpu", torch.float32, 3.0, None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cores.workers(usual, 64) == 1 and cores.describe("cpu") == "one batch at a time"
    finally:
        torch.set_num_threads(before)
    assert cores.describe("cuda") == "one batch at a time"
