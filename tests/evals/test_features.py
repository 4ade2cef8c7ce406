"""The offline feature network: input conventions, the [-1, 1] helper, and the weights' hash pin."""

import shutil

import pytest
import torch

from distill.errors import ModelError
from distill.offline import EFFNET_LITE0_SHA256, effnet_lite0_weights, verify
from evals.features import EffNetFeatures, build_feature_net, default_feature_net, features


def test_uint8_and_unit_float_inputs_give_the_same_features():
    net = default_feature_net()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    from_uint8, from_float = net(pixels), net(pixels.float() / 255)
    assert from_uint8.shape == (2, EffNetFeatures.num_features) == (2, 1280)
    torch.testing.assert_close(from_uint8, from_float)
    assert not torch.allclose(from_uint8[0], from_uint8[1])  # it does look at the image


def test_helper_maps_minus_one_one_to_unit_range_without_grad():
    images = torch.rand(3, 3, 32, 32, requires_grad=True) * 2 - 1
    feats = features(images, batch_size=2)
    assert feats.shape == (3, 1280) and not feats.requires_grad
    torch.testing.assert_close(feats, default_feature_net()((images.detach() + 1) / 2))


def test_module_stays_frozen_in_eval_mode():
    net = default_feature_net()
    net.train()
    assert not net.net.training and not any(p.requires_grad for p in net.parameters())


def test_tampered_weights_are_refused(tmp_path):
    original = effnet_lite0_weights()
    copy = tmp_path / "effnet.pth"
    shutil.copyfile(original, copy)
    assert verify(copy, EFFNET_LITE0_SHA256, "copy") == copy
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "tampered.pth"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        verify(tampered, EFFNET_LITE0_SHA256, "EfficientNet-Lite0 weights")


def test_inception_offline_and_unknown_names_raise_model_error():
    with pytest.raises(ModelError, match="effnet-lite0"):
        build_feature_net("inception")
    with pytest.raises(ModelError, match="Unknown feature network"):
        build_feature_net("vgg")
