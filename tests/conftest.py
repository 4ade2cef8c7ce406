"""Shared fixtures. Nothing here touches the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Tiny random-weight pipelines (distill.tiny), built once per test session.
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from distill.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory):
    from distill.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v") / "pipe", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_bert_path(tmp_path_factory):
    from distill.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_bert") / "pipe", text_encoder="bert")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from distill.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "pipe")


@pytest.fixture(scope="session")
def tiny_unet2d_path(tmp_path_factory):
    from distill.tiny import build_tiny_unet2d

    return build_tiny_unet2d(tmp_path_factory.mktemp("tiny_unet2d") / "pipe")


@pytest.fixture(scope="session")
def tiny_unet2d_class_path(tmp_path_factory):
    from distill.tiny import build_tiny_unet2d

    return build_tiny_unet2d(tmp_path_factory.mktemp("tiny_unet2d_class") / "pipe", num_class_embeds=5)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from distill.tiny_flow import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    from distill.tiny_flow import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipe")
