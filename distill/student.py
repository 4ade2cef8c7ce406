"""Students built from a teacher's UNet: a full copy with a guidance-scale input, or LoRA adapters on it.

Two kinds, as LCM (Luo et al. 2023, arXiv:2310.04378) and LCM-LoRA (Luo et al. 2023, arXiv:2311.05556):

- full: a copy of the teacher's UNet2DConditionModel with `time_cond_proj_dim` set, so it takes the
  guidance scale as an input (`timestep_cond`, the sinusoidal embedding diffusers' LCM pipelines feed).
  The new projection starts at zero, so the student starts as exactly the teacher for every guidance scale.
- lora: peft LoRA adapters on the teacher's own UNet; with the adapters disabled it *is* the teacher,
  so only one UNet is held in memory. It has no guidance input: the guidance it was distilled at is baked in.

Guidance convention: LCM writes CFG as cond + omega (cond - uncond); diffusers as uncond + w (cond - uncond),
so omega = w - 1. The embedding takes omega (diffusers' pipelines embed `guidance_scale - 1`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from distill.engine import ema_update_
from distill.errors import ModelError
from distill.teacher import Cond

# Every conv and linear layer of the UNet's blocks, as diffusers' LCM-LoRA distillation scripts target.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name
INFO_FILE = "student.json"


# ------------------------------------------------------------------------------------- guidance input
def guidance_embedding(omega: Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of 1000 * omega, [B] -> [B, embedding_dim], as diffusers' LCM pipelines build it.

    emb_j = sin(1000 omega f_j) for j < D/2 and cos(...) after, f_j = 10000^(-j / (D/2 - 1)) (Ho et al.'s
    timestep embedding, VDM's `get_timestep_embedding`); an odd D is zero-padded. omega = guidance_scale - 1.
    """
    omega = torch.as_tensor(omega).reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = omega[:, None] * freqs.to(omega.device)[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if embedding_dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


# --------------------------------------------------------------------------------------------- full
def build_full_student(teacher_unet, time_cond_proj_dim: int = 256):
    """A float32 trainable copy of the teacher's UNet with a guidance-scale input of `time_cond_proj_dim` dims.

    A teacher that already has `time_cond_proj_dim` (an LCM, say) keeps its own. The new input projection
    (`time_embedding.cond_proj`) is zero-initialised, so the copy reproduces the teacher at any guidance.
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher_unet, UNet2DConditionModel):
        raise ModelError(
            f"A full LCM student needs a UNet2DConditionModel teacher, not a {type(teacher_unet).__name__}; "
            "use a Stable Diffusion or SDXL pipeline as the teacher."
        )
    own = teacher_unet.config.time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=own or time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not key.startswith("time_embedding.cond_proj") for key in missing):
        raise ModelError(f"The teacher's UNet weights do not fit its own config (missing {missing[:3]}).")
    if own is None:
        torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(teacher_unet.device).train().requires_grad_(True)  # from_config made it float32


# --------------------------------------------------------------------------------------------- LoRA
def add_lora(unet, rank: int, alpha: float | None = None, target_modules=LCM_LORA_TARGETS, dropout: float = 0.0):
    """Add peft LoRA adapters (rank r, scale alpha / r, alpha defaulting to r) to `unet` in place.

    Only the adapters are trainable (float32, for mixed precision); returns them as a parameter list.
    Target names that the UNet lacks are skipped; none matching is a ModelError.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    names = [name for name, _ in unet.named_modules()]
    present = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ModelError(
            f"None of the LoRA target modules {list(target_modules)} exist in the teacher's UNet; "
            "set student.lora_target_modules to names of its Linear/Conv2d layers."
        )
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=present, lora_dropout=dropout))
    cast_training_params(unet, torch.float32)
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(unet):
    """Run the LoRA'd UNet as the bare teacher inside the block (diffusers' PEFT integration)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class AdapterEMA:
    """theta^- for a LoRA student: an exponential moving average of its adapter weights (decay mu).

    LCM-LoRA uses the student itself as its target; an average is steadier on short, small-batch runs.
    `applied()` swaps the average into the adapters' tensors for a block (the target pass, sampling,
    saving) and the online weights back afterwards; the optimizer keeps the same parameter objects.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = list(params), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- mu shadow + (1 - mu) online."""
        ema_update_(self.shadow, self.params, self.decay)

    @torch.no_grad()
    def reset(self) -> None:
        """shadow <- the adapters' current weights (after loading a checkpoint's average into them)."""
        for shadow, p in zip(self.shadow, self.params):
            shadow.copy_(p)

    @contextmanager
    def applied(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for p, shadow in zip(self.params, self.shadow):
            p.data, shadow.data = shadow.data, p.data


def lora_state_dict(unet) -> dict[str, Tensor]:
    """The adapters' weights with peft's key names (`<module>.lora_A.weight`, `<module>.lora_B.weight`).

    These are the names diffusers' `load_lora_weights` converts every other UNet LoRA format into, so it
    loads them as they are. `convert_state_dict_to_diffusers` is not applied: it renames only the attention
    projections (to `lora.down`/`lora.up`), and diffusers 0.42 decides from the *first* key whether to
    convert a file back, so a mixed file loses the attention adapters or the rest (tests/distill/test_export.py).
    """
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def _pipeline_class(teacher_kind: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if teacher_kind == "sdxl" else StableDiffusionPipeline


def save_lora(unet, folder: str | Path, teacher_kind: str) -> Path:
    """Write `pytorch_lora_weights.safetensors` that the pipeline's `load_lora_weights` reads (rank, alpha kept)."""
    folder = Path(folder)
    _pipeline_class(teacher_kind).save_lora_weights(
        folder, unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True,
    )
    return folder / LORA_WEIGHTS


def load_lora(unet, folder: str | Path, teacher_kind: str) -> None:
    """Load LoRA weights written by `save_lora` into the adapter `add_lora` made (for resuming)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    state, _ = _pipeline_class(teacher_kind).lora_state_dict(str(folder))
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"The LoRA weights in {folder} do not fit this student (e.g. {result.unexpected_keys[0]}).")


# ------------------------------------------------------------------------------------------ forward
def predict(unet, z_t: Tensor, t: Tensor, cond: Cond, timestep_cond: Tensor | None = None) -> Tensor:
    """Raw UNet output (the teacher's parameterisation) for z_t [B, C, H, W] at t [B] under `cond`."""
    return unet(
        z_t, t, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
        added_cond_kwargs=cond.added_cond_kwargs, return_dict=False,
    )[0]


# ------------------------------------------------------------------------------------ what it is
@dataclass
class StudentInfo:
    """What a saved student is, written as `student.json` beside its weights (and into exports)."""

    kind: str  # "full" | "lora"
    teacher: str  # the teacher pipeline: a local folder (absolute) or a hub id
    teacher_kind: str  # "sd" | "sdxl"
    prediction_type: str
    num_ddim_timesteps: int  # N: LCMScheduler's original_inference_steps
    timestep_scaling: float
    w_min: float  # omega range it was distilled on (omega = guidance_scale - 1)
    w_max: float
    guidance_scale: float  # what to pass to the pipeline: 1 + mid omega (full); 1.0 (LoRA: guidance baked in)
    teacher_guidance_scale: float  # the teacher's guidance the student imitates at that setting
    step: int = 0
    scheduler: str = "LCMScheduler"  # sample with it, built from the teacher's scheduler config (see README.md)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / INFO_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> StudentInfo:
        path = Path(folder) / INFO_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError) as err:
            raise ModelError(f"{path} is missing or unreadable ({err}); re-run the export or the training.") from err
