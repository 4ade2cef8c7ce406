"""Students built from a teacher's denoiser: a full trainable copy, or LoRA adapters on the teacher's own weights.

Both kinds are one abstraction, `Student`: an `nn.Module` called like its teacher (`student(z_t, t, cond, omega)`
returns the teacher's parameterisation, through the teacher's family adaptor and schedule), with
`trainable_parameters()`, `teacher_mode()` (the bare teacher, for LoRA: adapters off), `save_weights` (the format
that ships) and `save_checkpoint` / `load_checkpoint` (the engine's natural format for this module).

- `FullStudent`: a float32 copy of the teacher's network; for a UNet2DConditionModel with `time_cond_proj_dim`
  set, so it takes LCM's omega as an input (`timestep_cond`, the embedding diffusers' LCM pipelines feed). The new
  projection starts at zero, so the copy starts as exactly the teacher for every guidance scale.
- `LoraStudent`: peft adapters on the teacher's own network, so only one network is in memory. Adapters are
  named: several can live on one base (DMD2's fake score beside the generator), `adapter(name)` selects one.
  It has no guidance input: the guidance it was distilled at is baked in.

Guidance convention: LCM writes CFG as cond + omega (cond - uncond); diffusers as uncond + w (cond - uncond),
so omega = w - 1 (LCM, Luo et al. 2023, arXiv:2310.04378; LCM-LoRA, arXiv:2311.05556).
"""

from __future__ import annotations

import contextlib
import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from distill.cond import Cond
from distill.errors import ModelError
from distill.guidance import guidance_embedding
from distill.info import LORA_WEIGHTS

# Every conv and linear layer of the UNet's blocks, as diffusers' LCM-LoRA distillation scripts target.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


class Student(torch.nn.Module):
    """A trainable denoiser with its teacher's calling convention (see the module docstring)."""

    kind = ""

    def __init__(self, teacher, network: torch.nn.Module):
        super().__init__()
        object.__setattr__(self, "teacher", teacher)  # shared and frozen: not a submodule, never copied or saved
        self.network = network

    @property
    def guidance_dim(self) -> int | None:
        """Width of the guidance-scale input (`time_cond_proj_dim`), or None without one."""
        return getattr(self.network.config, "time_cond_proj_dim", None)

    def forward(self, z_t: Tensor, t: Tensor, cond: Cond, omega: Tensor | None = None) -> Tensor:
        """Raw output in the teacher's parameterisation for z_t [B, C, H, W] at the schedule's times t [B].

        omega [B]: LCM's guidance (diffusers' guidance_scale - 1) for a student with a guidance input.
        """
        w_embedding = None
        if omega is not None and self.guidance_dim:
            w_embedding = guidance_embedding(omega, self.guidance_dim).to(z_t.device, z_t.dtype)
        return self.teacher(z_t, t, cond, w_embedding, network=self.network)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def teacher_mode(self):
        """A context in which the teacher's own network computes the teacher (for LoRA: adapters off)."""
        return contextlib.nullcontext()

    def save_checkpoint(self, folder: Path) -> None:
        self.save_weights(folder)


class FullStudent(Student):
    """A float32 copy of the teacher's network (with a zero-initialised guidance input when asked for)."""

    kind = "full"

    def __init__(self, teacher, time_cond_proj_dim: int | None = 256, network: torch.nn.Module | None = None):
        if network is None:
            network = build_full_network(teacher.network, time_cond_proj_dim)
        super().__init__(teacher, network)

    def frozen_copy(self) -> FullStudent:
        """A copy of the network for a target or EMA (theta^- <- theta), without gradients."""
        return FullStudent(self.teacher, network=copy.deepcopy(self.network).requires_grad_(False))

    def save_weights(self, folder: Path) -> None:
        """The network in the pipeline's own sub-folder (`unet/`, or `transformer/` for SD3 and FLUX)."""
        self.network.save_pretrained(Path(folder) / self.teacher.family.network_attr, safe_serialization=True)

    def load_checkpoint(self, folder: Path) -> None:
        saved = type(self.network).from_pretrained(str(Path(folder) / self.teacher.family.network_attr))
        self.network.load_state_dict(saved.state_dict())


class LoraStudent(Student):
    """LoRA adapters (rank r, scale alpha / r) on the teacher's own network; only the adapters train."""

    kind = "lora"

    def __init__(self, teacher, rank: int, alpha: float | None = None, target_modules=LCM_LORA_TARGETS,
                 dropout: float = 0.0, adapter_name: str = "default"):
        super().__init__(teacher, teacher.network)
        self.adapter_name = adapter_name
        self.add_adapter(adapter_name, rank, alpha, target_modules, dropout)

    def add_adapter(self, name: str, rank: int, alpha: float | None = None, target_modules=LCM_LORA_TARGETS,
                    dropout: float = 0.0) -> list[torch.nn.Parameter]:
        """Add a named adapter (float32, trainable); target names the network lacks are skipped."""
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        names = [n for n, _ in self.network.named_modules()]
        present = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
        if not present:
            raise ModelError(f"None of the LoRA target modules {list(target_modules)} exist in the teacher's network; "
                             "set student.lora_target_modules to names of its Linear/Conv2d layers.")
        self.network.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=present, lora_dropout=dropout)
        self.network.add_adapter(config, adapter_name=name)
        self._activate(self.adapter_name)
        cast_training_params(self.network, torch.float32)
        return self.adapter_parameters(name)

    def _activate(self, name: str | None) -> None:
        """Make `name` the active adapter (None: adapters off). peft also flips requires_grad of the adapters it
        (de)activates; every adapter stays trainable here, so each optimizer keeps its parameters."""
        if name is None:
            self.network.disable_adapters()
        else:
            self.network.enable_adapters()
            self.network.set_adapter(name)
        for param_name, param in self.network.named_parameters():
            param.requires_grad_(".lora_" in param_name)

    def adapter_parameters(self, name: str | None = None) -> list[torch.nn.Parameter]:
        name = name or self.adapter_name
        return [p for n, p in self.network.named_parameters() if f".{name}." in n and ".lora_" in n]

    @contextmanager
    def adapter(self, name: str):
        """Run the network with the named adapter active (e.g. a fake-score adapter beside the generator's)."""
        self._activate(name)
        try:
            yield self
        finally:
            self._activate(self.adapter_name)

    @contextmanager
    def teacher_mode(self):
        self._activate(None)
        try:
            yield self
        finally:
            self._activate(self.adapter_name)

    def save_weights(self, folder: Path) -> Path:
        """`pytorch_lora_weights.safetensors` that the pipeline's `load_lora_weights` reads (rank, alpha kept)."""
        from peft import get_peft_model_state_dict

        folder = Path(folder)
        # peft's key names are what diffusers' `load_lora_weights` converts every other UNet format into, so it loads
        # them as they are; `convert_state_dict_to_diffusers` would rename only the attention projections, and
        # diffusers 0.42 decides from the first key whether to convert back (tests/distill/test_export.py).
        state = get_peft_model_state_dict(self.network, adapter_name=self.adapter_name)
        name = self.teacher.family.network_attr  # the pipeline's argument names: unet_... or transformer_...
        type(self.teacher.pipe).save_lora_weights(folder, safe_serialization=True, **{
            f"{name}_lora_layers": state,
            f"{name}_lora_adapter_metadata": self.network.peft_config[self.adapter_name].to_dict()})
        return folder / LORA_WEIGHTS

    def load_checkpoint(self, folder: Path) -> None:
        """Load weights written by `save_weights` into this adapter (resuming)."""
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict

        state = type(self.teacher.pipe).lora_state_dict(str(folder))
        state = state[0] if isinstance(state, tuple) else state  # the UNet pipelines also return alphas
        prefix = self.teacher.family.network_attr + "."
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(self.network, convert_unet_state_dict_to_peft(state),
                                           adapter_name=self.adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ModelError(f"The LoRA weights in {folder} do not fit this student (e.g. {result.unexpected_keys[0]}).")


def build_full_network(teacher_network, time_cond_proj_dim: int | None = 256):
    """A float32 trainable copy of the teacher's UNet with a guidance-scale input of `time_cond_proj_dim` dims.

    A teacher that already has `time_cond_proj_dim` (an LCM, say) keeps its own; None copies it as it is (any
    network: a transformer student then has its guidance baked in, as a LoRA's is). The new input projection
    (`time_embedding.cond_proj`) is zero-initialised, so the copy reproduces the teacher.
    """
    from diffusers import UNet2DConditionModel

    if time_cond_proj_dim is None and not isinstance(teacher_network, UNet2DConditionModel):
        return copy.deepcopy(teacher_network).float().train().requires_grad_(True)
    if not isinstance(teacher_network, UNet2DConditionModel):
        raise ModelError(f"A full student with a guidance input needs a UNet2DConditionModel teacher, not a "
                         f"{type(teacher_network).__name__}; set student.time_cond_proj_dim=null (the guidance is "
                         "then baked in), or use a Stable Diffusion or SDXL teacher.")
    own = teacher_network.config.time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher_network.config, time_cond_proj_dim=own or time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_network.state_dict(), strict=False)
    if unexpected or any(not key.startswith("time_embedding.cond_proj") for key in missing):
        raise ModelError(f"The teacher's UNet weights do not fit its own config (missing {missing[:3]}).")
    if own is None and time_cond_proj_dim:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_network.device).train().requires_grad_(True)  # from_config made it float32
