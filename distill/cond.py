"""`Cond`: everything a denoiser needs besides z_t and t, for a batch, whatever the teacher family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cond:
    """Everything the network needs besides z_t and t, for a batch of B samples.

    encoder_hidden_states: [B, L, D] text embeddings (SD, SDXL).
    added_cond_kwargs: SDXL's {"text_embeds": [B, D_pooled], "time_ids": [B, 6]}; SD3's and FLUX's
        {"pooled_projections": [B, D_pooled]}.
    class_labels: [B] long class indices (class-conditional UNet2DModel).
    batch_size: only for a Cond that holds no tensors (unconditional models), to keep its length.
    """

    encoder_hidden_states: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None
    class_labels: Tensor | None = None
    batch_size: int | None = None

    def tensors(self) -> list[Tensor]:
        extra = list(self.added_cond_kwargs.values()) if self.added_cond_kwargs else []
        return [x for x in (self.encoder_hidden_states, self.class_labels, *extra) if x is not None]

    def __len__(self) -> int:
        tensors = self.tensors()
        if tensors:
            return tensors[0].shape[0]
        if self.batch_size is None:
            raise ValueError("This Cond holds no tensors and no batch_size, so it has no length.")
        return self.batch_size

    def _map(self, fn, other: Cond | None = None, batch_size: int | None = None) -> Cond:
        """Apply fn(x), or fn(x, y) with y the other Cond's matching tensor, to every tensor."""

        def one(x, y):
            if x is None:
                return None
            if other is None:
                return fn(x)
            if y is None:
                raise ValueError("Cannot combine Conds that hold different fields.")
            return fn(x, y)

        mine, theirs = self.added_cond_kwargs, getattr(other, "added_cond_kwargs", None) or {}
        return Cond(
            encoder_hidden_states=one(self.encoder_hidden_states, getattr(other, "encoder_hidden_states", None)),
            added_cond_kwargs=None if mine is None else {k: one(v, theirs.get(k)) for k, v in mine.items()},
            class_labels=one(self.class_labels, getattr(other, "class_labels", None)),
            batch_size=None if self.tensors() else batch_size,
        )

    def pooled(self) -> Tensor:
        """One vector per sample [B, D] that summarises the text: SDXL's pooled embedding where there is one, else
        the mean of the token states (what a discriminator head is conditioned on by projection)."""
        for key in ("text_embeds", "pooled_projections"):
            if self.added_cond_kwargs and key in self.added_cond_kwargs:
                return self.added_cond_kwargs[key]
        if self.encoder_hidden_states is None:
            raise ValueError("This Cond holds no text embedding to pool (a class- or unconditional model).")
        return self.encoder_hidden_states.mean(dim=1)

    def cat(self, other: Cond) -> Cond:
        """Batch concatenation [self; other]; both must hold the same fields."""
        if len(self.tensors()) != len(other.tensors()):
            raise ValueError("Cannot concatenate Conds that hold different fields.")
        return self._map(lambda x, y: torch.cat([x, y]), other, len(self) + len(other))

    def repeat(self, n: int) -> Cond:
        """Each sample repeated n times in place (repeat_interleave): [a, b] -> [a, a, b, b]."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0), batch_size=len(self) * n)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cond:
        """Move every tensor to `device`; cast floating-point ones to `dtype` (class labels stay long)."""

        def move(x):
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        return self._map(move, batch_size=self.batch_size)

    def select(self, index) -> Cond:
        """The samples at `index` (int, slice, list, long or bool tensor), batch dim kept."""
        if isinstance(index, int):
            index = [index]
        size = torch.arange(len(self))[index].numel()
        return self._map(lambda x: x[index], batch_size=size)
