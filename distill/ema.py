"""Exponential moving averages of weights: theta^- <- mu theta^- + (1 - mu) theta.

Consistency models keep one as the target network (Song et al. 2023, arXiv:2303.01469; LCM uses mu = 0.95);
diffusion training ships one (the teacher recipe). `ema_update_` works on two modules or two tensor lists;
`AdapterEMA` averages a LoRA student's adapters and swaps the average in where it is used.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


@torch.no_grad()
def ema_update_(target, online, decay: float) -> None:
    """target <- decay * target + (1 - decay) * online, parameter by parameter (in place).

    target, online: two modules with the same parameters, or two lists of tensors (e.g. LoRA adapters).
    """
    t_params, o_params = [list(m.parameters()) if isinstance(m, torch.nn.Module) else list(m)
                          for m in (target, online)]
    if len(t_params) != len(o_params):
        raise ValueError("EMA target and online model have different parameters.")
    torch._foreach_lerp_(t_params, [p.detach().to(q.dtype) for p, q in zip(o_params, t_params)], 1.0 - decay)


class AdapterEMA:
    """theta^- for a LoRA student: an exponential moving average of its adapter weights (decay mu).

    LCM-LoRA uses the student itself as its target; an average is steadier on short, small-batch runs.
    `applied()` swaps the average into the adapters' tensors for a block (the target pass, sampling,
    saving) and the online weights back afterwards; the optimizer keeps the same parameter objects.
    `state_dict` / `load_state_dict` make it a checkpointed module of a method (tensors keyed by position).
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- mu shadow + (1 - mu) online."""
        ema_update_(self.shadow, self.params, self.decay)

    @contextmanager
    def applied(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, shadow in zip(self.params, self.shadow):
            p.data, shadow.data = shadow.data, p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"shadow.{i}": s.detach().contiguous() for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow) or any(state[f"shadow.{i}"].shape != s.shape
                                                 for i, s in enumerate(self.shadow)):
            raise ValueError("The saved adapter average does not fit these adapters.")
        for i, shadow in enumerate(self.shadow):
            shadow.copy_(state[f"shadow.{i}"])
