"""Checks on saved weights that read no tensor: files present, safetensors headers whole, a LoRA's shapes against
the UNet it is loaded into.

A truncated download or copy, a component saved without its weights (the embedded teacher's text encoder before
`distill setup`), or a LoRA trained on another base model is found here in a moment, before any pipeline loads,
instead of deep inside diffusers after the teacher has run.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack")
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # diffusers' (PEFT) LoRA keys: unet.<layer>.lora_A.weight


def tensor_shapes(path: str | Path, what: str) -> dict[str, list[int]]:
    """{tensor name: shape} from the header of a .safetensors file; a ModelError if it is truncated or not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ModelError(f"{what} {path} is truncated or not a safetensors file ({reason}); copy or download it "
                         "again.") from err


def check_headers(folder: str | Path, what: str) -> None:
    """Every .safetensors file under `folder` has a whole header and is as long as it says."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        tensor_shapes(path, f"{what}'s weights file")


def check_components(folder: str | Path, index: dict, what: str) -> None:
    """Each model component a pipeline's model_index.json lists has its weights, and they are whole."""
    folder = Path(folder)
    for name, spec in index.items():
        part = folder / name
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or not part.is_dir():
            continue
        if (part / "config.json").is_file() and not any(f.suffix in WEIGHT_SUFFIXES for f in part.iterdir()):
            raise ModelError(_no_weights(folder, name, what))
        check_headers(part, what)


def _no_weights(folder: Path, name: str, what: str) -> str:
    from distill.offline import is_minilm_config

    if name == "text_encoder" and is_minilm_config(folder / name / "config.json"):
        return (f"{what} at {folder} has no text encoder weights yet (text_encoder/ holds only its config): run "
                f"`distill setup --teacher {folder}` to put the offline MiniLM weights there.")
    return (f"{what} at {folder} has no weights in {name}/ (only its config): download the pipeline again or "
            "re-save it with save_pretrained.")


def unet_config(teacher: str | Path) -> dict | None:
    """The teacher's unet/config.json where the teacher is a local folder (None for a hub id)."""
    path = Path(teacher).expanduser() / "unet" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def lora_mismatch(shapes: dict[str, list[int]], config: dict) -> str | None:
    """Where a diffusers-format LoRA (its tensor shapes) does not fit the UNet built from `config`, in words; None
    when every layer it names is in that UNet with the same input and output widths. Other key formats pass."""
    layers = sorted(k[len("unet."):-len(LORA_A)] for k in shapes if k.startswith("unet.") and k.endswith(LORA_A))
    if not layers:
        return None
    modules = dict(_empty_network(config).named_modules())
    for layer in layers:
        if layer not in modules:
            return f"its layer {layer} is not in the teacher's UNet"
        want = _widths(modules[layer])
        have = (shapes[f"unet.{layer}{LORA_A}"][1], shapes.get(f"unet.{layer}{LORA_B}", [None])[0])
        if want is not None and have != want:
            return f"its layer {layer} maps {have[0]} -> {have[1]} features, the teacher's {want[0]} -> {want[1]}"
    return None


def _empty_network(config: dict):
    """The network a config describes, on the meta device: its layers and shapes without any memory."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
    with init_empty_weights():
        return cls.from_config(config)


def _widths(module) -> tuple[int, int] | None:
    """(input, output) features of a Linear or a convolution; None for other layers."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    if hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
        return module.in_channels, module.out_channels
    return None


def check_lora(path: str | Path, teacher: str | Path, fix: str) -> None:
    """A LoRA file is whole and fits the teacher's UNet (when the teacher is a local folder); else a ModelError
    ending with `fix`."""
    shapes = tensor_shapes(path, "The LoRA")
    config = unet_config(teacher)
    problem = None if config is None else lora_mismatch(shapes, config)
    if problem:
        raise ModelError(f"The LoRA {path} does not fit the teacher {teacher} ({problem}): it was trained on another "
                         f"base model; {fix}.")


def check_student_weights(folder: str | Path, info, teacher: str | Path, fix: str) -> None:
    """A distill student's weights (its LoRA file or its network folder, as `info` says) are whole and fit the
    teacher they will be loaded with; `fix` ends the sentence when they were made from another base model."""
    folder = Path(folder)
    if info.kind != "lora":
        return check_network(folder / info.weights, teacher, fix)
    if not (folder / info.weights).is_file():
        raise ModelError(f"The student at {folder} has no {info.weights}; re-run the export or the training.")
    check_lora(folder / info.weights, teacher, fix)


FIT_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "sample_size")


def check_network(folder: str | Path, teacher: str | Path, fix: str) -> None:
    """A full student's network folder has its weights, whole, and takes the teacher's latents and text states."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file() or not any(f.suffix in WEIGHT_SUFFIXES for f in folder.iterdir()):
        raise ModelError(f"The student network at {folder} has no config.json or no weights; re-run the export or "
                         "the training.")
    check_headers(folder, "The student network")
    mine, theirs = json.loads(config_path.read_text()), unet_config(teacher) or {}
    changed = [k for k in FIT_KEYS if k in theirs and mine.get(k) != theirs[k]]
    if changed:
        raise ModelError(f"The student network at {folder} does not fit the teacher {teacher} ({changed[0]} "
                         f"{mine.get(changed[0])} vs {theirs[changed[0]]}): it was made from another base model; "
                         f"{fix}.")
