"""Two processes for real: `torchrun --nproc_per_node 2` on the CPU (gloo), through `distill train`.

Micro-batches are numbered across processes and accumulation steps (engine.micro_batch_index), so P processes draw
exactly the samples one process draws with P-fold gradient accumulation: the same global batch, the same update.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.config import save_config
from distill.runs import list_runs
from tests.recipes import test_add, test_lcm

CLI = str(Path(__file__).resolve().parents[2] / "cli.py")


def _train(config: Path, processes: int) -> Path:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launch if processes > 1 else [sys.executable]), CLI, "train", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = list_runs(Path(config).parent / "runs")
    assert len(found) == 1  # one run folder: only the main process chose and wrote it
    assert json.loads((found[0] / "report.json").read_text())["processes"] == processes
    return found[0]


def _configs(tmp_path, make, **common) -> tuple[Path, Path]:
    two = save_config(make(tmp_path / "two", train_batch_size=2, **common), tmp_path / "two" / "config.yaml")
    one = save_config(make(tmp_path / "one", train_batch_size=2, gradient_accumulation_steps=2, **common),
                      tmp_path / "one" / "config.yaml")
    return two, one


# The long-run settings too: the anchors (each process solves the same ones), the probe (the main process probes,
# the other waits) and the shipped EMA.
LONG_RUN = dict(data=dict(source="emoji:32", resolution=16, max_samples=20, holdout_rows=2),
                probe=dict(every_steps=2, num_samples=4, steps=2),
                lcd=dict(w_min=1.0, w_max=3.0, anchor_weight=1.0, anchor_trajectories=4),
                student=dict(lora_rank=4, ship_ema_decay=0.9))


@pytest.mark.slow
def test_two_processes_equal_one_process_accumulating_two_for_the_lcm_lora(tiny_sd_path, tmp_path):
    def make(folder, **over):
        return test_lcm._cfg(folder, tiny_sd_path, "lora", max_train_steps=3, checkpointing_steps=0,
                             report_to="none", sample=dict(every_steps=0), **LONG_RUN, **over)

    two, one = _configs(tmp_path, make)
    a, b = _train(two, 2), _train(one, 1)
    assert (a / "anchors.safetensors").is_file() and (a / "best" / "student.json").is_file()  # the main process's
    assert [json.loads(line)["step"] for line in (a / "probe.jsonl").read_text().splitlines()] == [0, 2]
    files = sorted(p.relative_to(a) for p in (a / "checkpoints" / "step-0000003" / "modules").rglob("*.safetensors"))
    assert files  # the online adapters and every other module of the method
    for name in [Path("student/pytorch_lora_weights.safetensors"), *files]:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert all(x[k].equal(y[k]) for k in x), name  # stated tolerance: none (bit-identical on CPU)
    start = load_file(str(a / "student" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in start.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_add_trains_on_two_processes_with_one_run_folder(tiny_sd_path, tmp_path):
    """ADD is not bit-identical to accumulation: the heads' spectral norm advances its power iteration once per
    forward, so accumulating runs it twice per update where two processes run it once (rank 0's vectors are
    broadcast). The student still takes the same steps to within the size of one update."""
    def make(folder, **over):
        return test_add._cfg(folder, tiny_sd_path, max_train_steps=3, checkpointing_steps=0, **over)

    two, one = _configs(tmp_path, make)
    a, b = _train(two, 2), _train(one, 1)
    weights = "checkpoints/step-0000003/modules/student/unet/diffusion_pytorch_model.safetensors"
    x, y = load_file(str(a / weights)), load_file(str(b / weights))
    start = load_file(str(tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = max((x[k] - start[k]).abs().max().item() for k in x)
    apart = max((x[k] - y[k]).abs().max().item() for k in x)
    assert moved > 0 and apart < moved


LAUNCH = sorted((Path(__file__).resolve().parents[2] / "launch").glob("*.yaml"))


@pytest.mark.parametrize("path", LAUNCH, ids=[p.stem for p in LAUNCH])
def test_every_launch_config_is_one_accelerate_reads_without_unknown_keys(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on an unknown key
    assert config.num_processes >= 2 and not config.use_cpu
    assert "accelerate launch --config_file launch/" in path.read_text()  # says how to use it


def test_the_launch_configs_cover_ddp_multinode_fsdp_and_zero2():
    assert {p.stem for p in LAUNCH} == {"ddp", "multinode", "fsdp", "deepspeed_zero2"}
