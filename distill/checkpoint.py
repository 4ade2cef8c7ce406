"""Each named module of a method saved in its natural format, and loaded back into the live object.

- an object with `save_checkpoint(folder)` / `load_checkpoint(folder)` decides itself (students: LoRA in
  diffusers format, or `save_pretrained`);
- a diffusers or transformers model: `save_pretrained` (safetensors), loaded with its class's `from_pretrained`;
- any other `nn.Module` (small heads), or an object whose `state_dict` holds only tensors (an adapter EMA):
  `model.safetensors`;
- any other object with `state_dict` (diffusers' EMAModel keeps counters beside its tensors): `state.pt`, read
  back with `weights_only=True`.
A module's folder that is missing or does not fit the live module is a ConfigError naming the module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.errors import ConfigError

SAFETENSORS = "model.safetensors"
STATE = "state.pt"


def save_module(module, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_checkpoint"):
        module.save_checkpoint(folder)
    elif hasattr(module, "save_pretrained") and isinstance(module, torch.nn.Module):
        module.save_pretrained(folder, safe_serialization=True)
    elif isinstance(module, torch.nn.Module) or all(torch.is_tensor(v) for v in module.state_dict().values()):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(folder / SAFETENSORS))
    else:
        torch.save(module.state_dict(), folder / STATE)


def load_module(module, folder: str | Path, name: str) -> None:
    """Load what `save_module` wrote in `folder` into `module` (in place); ConfigError naming `name` if it cannot."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"Checkpoint {folder.parent.parent} has no module '{name}', which this run needs (was it written by "
            "another recipe or config?); set resume_from_checkpoint=null or point it at a checkpoint of this run."
        )
    try:
        _load(module, folder)
    except (RuntimeError, ValueError, KeyError, OSError) as err:  # size mismatches, missing keys, unreadable files
        raise ConfigError(
            f"Module '{name}' in checkpoint {folder.parent.parent} does not fit this run ({str(err).splitlines()[0][:160]}); "
            "was a size setting (e.g. lora_rank, channels) changed? Set resume_from_checkpoint=null or another run_name."
        ) from err


def _load(module, folder: Path) -> None:
    if hasattr(module, "load_checkpoint"):
        module.load_checkpoint(folder)
    elif hasattr(module, "save_pretrained") and isinstance(module, torch.nn.Module):
        module.load_state_dict(type(module).from_pretrained(str(folder)).state_dict())
    elif (folder / SAFETENSORS).is_file():
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(folder / SAFETENSORS)))
    else:
        module.load_state_dict(torch.load(folder / STATE, weights_only=True))
