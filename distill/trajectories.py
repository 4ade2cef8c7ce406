"""The teacher's probability-flow ODE trajectories, solved once: anchors for a consistency student.

Consistency distillation only ties the interval n = 0 to the teacher; every other interval compares the student
with its own target, so a long run can drift to another fixed point (the student agrees with itself, not with
the teacher). Regressing the student's one-step map onto the teacher's ODE solution from points *on* the teacher's
trajectories ties every interval to the teacher (the regression term of CTM, Kim et al. 2023, arXiv:2310.02279;
DMD's regression loss, Yin et al. 2023, arXiv:2311.18828). Solving on a finer grid than the consistency solver's
(e.g. 50 DDIM steps for N = 10) also lifts the ceiling from the teacher at N steps towards the teacher at 50.

`solve_trajectories` runs guided DDIM (eta = 0) from pure noise at t = T - 1 over `solve_steps` points of the
schedule's grid, records z_t at each requested timestep (which must lie on that grid) and returns the final x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distill.cond import Cond
from distill.progress import Ticker


@dataclass
class Trajectories:
    """z [M, K, C, h, w] at `timesteps` [K] (descending), x0 [M, C, h, w] (the ODE's end), their conditions and
    guidance scales [M]."""

    z: Tensor
    timesteps: Tensor
    x0: Tensor
    cond: Cond
    guidance: Tensor

    def __len__(self) -> int:
        return len(self.x0)

    def save(self, path: Path, key: str) -> None:
        """z, timesteps, x0 and guidance as safetensors (the conditions are cheap to encode again), tagged `key`."""
        tensors = {"z": self.z, "timesteps": self.timesteps, "x0": self.x0, "guidance": self.guidance}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"key": key})

    @classmethod
    def load(cls, path: Path, key: str, cond: Cond) -> Trajectories | None:
        """The trajectories saved at `path` under the same `key`, with `cond`; None if absent or made otherwise."""
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            t = {name: f.get_tensor(name) for name in f.keys()}
        return cls(t["z"], t["timesteps"], t["x0"], cond, t["guidance"])

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Cond, Tensor]:
        """(z_t [B, C, h, w], t [B], x0 [B, C, h, w], cond, guidance [B]): random rows at random recorded times."""
        rows = torch.randint(len(self), (batch_size,), generator=generator)
        k = torch.randint(len(self.timesteps), (batch_size,), generator=generator)
        return self.z[rows, k], self.timesteps[k], self.x0[rows], self.cond.select(rows), self.guidance[rows]


@torch.no_grad()
def solve_trajectories(teacher, cond: Cond, noise: Tensor, guidance: Tensor, record: Tensor, solve_steps: int = 50,
                       batch_size: int = 128, show: bool = False) -> Trajectories:
    """Guided DDIM trajectories of `teacher` from `noise` [M, C, h, w] (at t = T - 1) for conditions `cond` [M] and
    guidance scales [M], z recorded at the timesteps `record` [K]; x0 is the last step's x0 prediction."""
    grid = teacher.schedule.grid(solve_steps).flip(0)  # descending: the noisiest first
    on_grid = torch.isclose(record.to(grid.dtype)[:, None], grid[None]).any(1)
    if not on_grid.all():
        raise ValueError(f"Timesteps {record[~on_grid].tolist()} are not on the {solve_steps}-step solver grid.")
    record = record.to(grid.dtype).sort(descending=True).values
    zs, x0s = [], []
    what = f"{solve_steps} guided DDIM steps, Euler on a flow teacher"
    ticker = Ticker(f"solving teacher ODE trajectories once ({what})", len(noise),
                    every_seconds=30, enabled=show)
    for start in range(0, len(noise), batch_size):
        rows = slice(start, start + batch_size)
        z, x0 = _solve(teacher, noise[rows], cond.select(torch.arange(len(noise))[rows]), guidance[rows], grid, record)
        zs.append(z)
        x0s.append(x0)
        ticker.update(min(start + batch_size, len(noise)))
    return Trajectories(torch.cat(zs), record, torch.cat(x0s), cond, guidance)


def _solve(teacher, z: Tensor, cond: Cond, guidance: Tensor, grid: Tensor, record: Tensor) -> tuple[Tensor, Tensor]:
    x0, kept = guided_ddim(teacher, z.to(teacher.device), grid.to(teacher.device), cond, guidance.to(teacher.device),
                           record.to(teacher.device))
    return torch.stack([k.cpu() for k in kept], dim=1), x0.cpu()


def guided_ddim(teacher, z: Tensor, grid: Tensor, cond: Cond, guidance, record: Tensor | None = None):
    """The teacher's probability-flow ODE by DDIM (eta = 0, Euler on a flow schedule) with CFG, over the descending
    times `grid` [S] from z [B, C, h, w] at grid[0]:
      x0_i, eps_i = to_x0_eps(guided(z_i, t_i));  z_{i+1} = alpha_{t_{i+1}} x0_i + sigma_{t_{i+1}} eps_i.
    Returns (x0 at the last grid time, float32 [B, C, h, w]; the float32 z at each time of `record` that is on the
    grid, in grid order). guidance: a float or [B] scales (1: no CFG pass)."""
    kept = []
    z = z.to(teacher.dtype)
    for i, t in enumerate(grid):
        if record is not None and torch.isclose(record.to(grid.dtype), t).any():
            kept.append(z.float())
        t_batch = t.expand(len(z))
        out = teacher.guided(z, t_batch, cond, guidance)
        x0, eps = teacher.to_x0_eps(out.float(), z.float(), t_batch)
        if i + 1 < len(grid):
            z = teacher.add_noise(x0, eps, grid[i + 1].expand(len(z))).to(teacher.dtype)
    return x0, kept
