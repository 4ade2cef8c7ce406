"""A small quality probe during training: KID of a few hundred student samples, and the best step so far.

Training loss says little about sample quality for a distilled student (a consistency loss can fall while samples
drift). The probe samples the student every so many steps, measures KID (Binkowski et al. 2018, "Demystifying MMD
GANs", arXiv:1801.01401; unbiased, so usable at a few hundred samples, unlike FD) between its images and the
real training images on the pooled features of a frozen network, and `BestKeeper` remembers which step scored best
and says when the last probes stopped improving on it.

The probe network is not the eval's judge (`distill.backbones.JUDGE`, EfficientNet-Lite0): choosing the shipped
checkpoint by the judge's own features would make the judge's score of it optimistic. The emoji default is
EfficientNet-Lite1 at 64 px, the same network the ADD discriminator reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.backbones import build_backbone


class PooledFeatures(nn.Module):
    """Images in [-1, 1] [B, 3, H, W] -> [B, C]: the global average of a frozen backbone's deepest feature map."""

    def __init__(self, spec: str = "effnet-lite1", resolution: int = 64):
        super().__init__()
        self.backbone = build_backbone(spec, resolution, key="probe.feature_net")
        self.name = spec

    @torch.no_grad()
    def forward(self, images: Tensor, batch_size: int = 128) -> Tensor:
        device = next(self.backbone.buffers()).device
        chunks = [self.backbone(images[i:i + batch_size].to(device))[-1].float().mean(dim=(2, 3)).cpu()
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).double()


def kid(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int | None = None, seed: int = 0) -> float:
    """Kernel Inception Distance on given features: mean over subsets of the unbiased MMD^2 with the cubic kernel
    k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018); real [N, d], fake [M, d]. Same estimator as torchmetrics'
    `KernelInceptionDistance` (its `poly_mmd`), with subsets drawn by a seeded generator so a probe repeats."""
    from torchmetrics.image.kid import poly_mmd

    m = min(len(real), len(fake), subset_size or len(fake))
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=generator)[:m]]
        f = fake[torch.randperm(len(fake), generator=generator)[:m]]
        scores.append(float(poly_mmd(r, f)))
    return sum(scores) / len(scores)


@dataclass
class BestKeeper:
    """The probe's history and its best (lowest) score; `patience` probes without improvement is a plateau."""

    patience: int = 3
    history: list[dict] = field(default_factory=list)

    @property
    def best(self) -> dict | None:
        scored = [h for h in self.history if math.isfinite(h["score"])]
        return min(scored, key=lambda h: (h["score"], h["step"])) if scored else None

    def record(self, step: int, score: float, **values: float) -> bool:
        """Add a probe; True when it is the best so far (a tie keeps the earlier step)."""
        before = self.best
        self.history.append({"step": step, "score": float(score), **values})
        return self.best is not before and self.best["step"] == step

    def since_best(self) -> list[dict]:
        best = self.best
        return [h for h in self.history if best is None or h["step"] > best["step"]]

    def plateaued(self) -> bool:
        """True once `patience` probes in a row came after the best one without beating it."""
        return self.patience > 0 and len(self.since_best()) >= self.patience

    def summary(self) -> dict:
        best = self.best
        return {"best_step": best and best["step"], "best_score": best and best["score"],
                "probes_since_best": len(self.since_best()), "plateau": self.plateaued(), "history": self.history}

    # -------------------------------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        path.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    @classmethod
    def load(cls, path: Path, patience: int, upto: int) -> BestKeeper:
        """The history in `path` up to step `upto` (a resumed run repeats later probes, and gets the same values)."""
        keeper = cls(patience)
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            keeper.history = [r for r in rows if r["step"] <= upto]
        return keeper
