"""Typed configs: YAML -> dataclasses, `key.sub=value` overrides, errors that name the key.

Every recipe declares a dataclass (subclassing `TrainConfig` for training recipes); its YAML
lives at `recipes/configs/<recipe>/<model>.yaml` and names the recipe with `recipe: <name>`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distill.errors import ConfigError


@dataclasses.dataclass
class TrainConfig:
    """Keys every training recipe has, so that scripts and the CLI can rely on them."""

    recipe: str = ""  # the recipe script under recipes/ this config drives
    run_name: str = ""  # run folders are <output_dir>/<NNN>-<run_name>; default <recipe>-<config file stem>
    teacher: str = ""  # a local diffusers pipeline folder or a hub id
    output_dir: str = "runs"  # run folders are created inside it, numbered
    seed: int = 0
    max_train_steps: int = 1000
    max_train_minutes: float | None = None  # wall-clock budget; whichever limit comes first ends the run
    train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2  # older checkpoints are deleted beyond this many
    resume_from_checkpoint: str | None = None  # null: a new run; a run folder, a checkpoint folder, or "latest"
    allow_config_change: bool = False  # resume even if a training setting differs from the run's (recorded beside it)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient stops the run, or skips the step
    report_to: str = "tensorboard"  # accelerate's trackers: tensorboard, wandb, ..., "all" or "none"


# Blocks every recipe that needs them declares with the same keys (one definition, here).
@dataclasses.dataclass
class DataConfig:
    source: str = "emoji:32"  # any distill.data source: emoji[:32|64], a local folder/parquet/jsonl/csv, a hub id
    image_column: str = "image"
    caption_column: str = "caption"
    resolution: int = 32  # images are resized and centre-cropped to this square before encoding
    max_samples: int | None = None  # only the first N rows (smoke runs); null: all
    cache: bool = True  # encode every image and caption once up front (small, fixed data); false: per batch
    num_workers: int = 0  # DataLoader workers when not cached
    holdout_rows: int = 0  # rows kept out of training (a fixed seed-0 draw, the same for every run): the probe's held-out set


@dataclasses.dataclass
class OptimConfig:
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit (CUDA only)
    max_grad_norm: float | None = 1.0  # null: no clipping
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 500
    lr_floor: float = 0.0  # cosine: the multiplier it ends at


@dataclasses.dataclass
class SampleConfig:
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["grinning face", "dog face", "banana", "flag: France"])
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])  # one grid column per step count
    every_steps: int = 500  # a grid into samples/ every so many steps; 0: only the final one
    teacher_steps: int | None = 50  # final grid: the teacher at this many steps beside the student; null: none
    guidance_scale: float | None = None  # pipeline guidance for the student; null: what the student was made for


@dataclasses.dataclass
class ProbeConfig:
    every_steps: int = 0  # a quality probe every so many steps (0: none); the best one is kept in best/
    num_samples: int = 256  # student samples per probe (KID is unbiased, so a few hundred suffice to rank steps)
    steps: int = 4  # sampling steps of the student in the probe
    feature_net: str = "effnet-lite1"  # frozen network for the probe's KID; never the eval's judge (effnet-lite0)
    feature_resolution: int = 64  # its input size
    patience: int = 3  # this many probes in a row without a new best: "quality stopped improving"
    stop_on_plateau: bool = False  # also stop training then (the schedule is cut; best/ holds the best student)


@dataclasses.dataclass(frozen=True)
class Bound:
    """The range of a numeric key: at least `low` (more than `low` when `strict`), below `high` when given;
    `null` says what null means where the key may be null."""

    low: float
    strict: bool = False
    high: float | None = None
    null: str = ""

    def fits(self, value: Any) -> bool:
        if value is None:  # the type check has already refused null where it is not allowed
            return True
        above = value > self.low if self.strict else value >= self.low
        return above and (self.high is None or value < self.high)

    def problem(self, value: Any) -> str | None:
        """None if `value` is in range (lists: every item), else what it must be."""
        if all(self.fits(v) for v in (value if isinstance(value, (list, tuple)) else [value])):
            return None
        need = f"more than {self.low:g}" if self.strict else f"at least {self.low:g}"
        need += f" and below {self.high:g}" if self.high is not None else ""
        return need + (f", or null for {self.null}" if self.null else "")


# Ranges of the shared keys (a recipe's own blocks check their own); inherited by every subclass of the block.
BOUNDS: dict[type, dict[str, Bound]] = {
    TrainConfig: {
        "seed": Bound(0), "max_train_steps": Bound(1), "max_train_minutes": Bound(0, strict=True, null="no time limit"),
        "train_batch_size": Bound(1), "gradient_accumulation_steps": Bound(1), "learning_rate": Bound(0, strict=True),
        "checkpointing_steps": Bound(0), "checkpoints_total_limit": Bound(1, null="keeping every checkpoint"),
    },
    DataConfig: {"resolution": Bound(1), "max_samples": Bound(1, null="every row"), "num_workers": Bound(0),
                 "holdout_rows": Bound(0)},
    ProbeConfig: {"every_steps": Bound(0), "num_samples": Bound(4), "steps": Bound(1), "feature_resolution": Bound(32),
                  "patience": Bound(0)},
    OptimConfig: {
        "weight_decay": Bound(0), "beta1": Bound(0, high=1), "beta2": Bound(0, high=1), "eps": Bound(0, strict=True),
        "max_grad_norm": Bound(0, strict=True, null="no clipping"), "lr_warmup_steps": Bound(0), "lr_floor": Bound(0),
    },
    SampleConfig: {"steps": Bound(1), "every_steps": Bound(0), "teacher_steps": Bound(1, null="no teacher column")},
}


def check_bounds(cfg: Any, prefix: str = "") -> None:
    """ConfigError naming the first key of `cfg` (a config dataclass) outside its range in `BOUNDS`."""
    for owner in type(cfg).__mro__:
        for name, bound in BOUNDS.get(owner, {}).items():
            value = getattr(cfg, name)
            need = bound.problem(value)
            if need:
                raise ConfigError(f"Config key '{prefix}{name}' is {value!r}; it must be {need}.")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"Config key '{key}' is {value!r}, expected {_type_name(tp)}.")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"Config key '{key}' is {value!r}; choose one of {', '.join(map(repr, args))}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' is {value!r}, expected a list ({_type_name(tp)}).")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' is {value!r}, expected a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' is {value!r}, expected a mapping of {tp.__name__} keys.")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"Config key '{key}' is {value!r} ({type(value).__name__}), expected {_type_name(tp)}.")


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts, nested ones included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        keys.append(prefix + field.name)
        tp = hints[field.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] if _is_optional(tp) else [tp]
        for sub in inner:
            if dataclasses.is_dataclass(sub):
                keys += valid_keys(sub, prefix + field.name + ".")
    return keys


def unknown_key_error(key: str, cls: type, prefix: str = "") -> ConfigError:
    candidates = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys here: {', '.join(candidates)}."
    return ConfigError(f"Unknown config key '{prefix}{key}' for {cls.__name__}.{hint}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise unknown_key_error(key, cls, prefix)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(f"Config for {cls.__name__} is incomplete: {err}.") from err
    check_bounds(cfg, prefix)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'unet.lr=1e-4' -> (['unet', 'lr'], 0.0001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' is not of the form key.sub=value.")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"Override '{text}' has no key before '='.")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"Override '{text}': '{part}' is a value, not a section.")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist: pass a YAML path (list them with `distill ls`).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Config file {path} is not valid YAML{where}: fix the syntax there.") from err
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must be a mapping of keys, not a {type(data).__name__}.")
    return data


def recipe_name(path: str | Path, data: dict | None = None) -> str:
    """The recipe a YAML drives: its `recipe:` key, else the folder it sits in."""
    data = read_yaml(path) if data is None else data
    return str(data.get("recipe") or Path(path).parent.name)


def load_config(path: str | Path, cls: type, overrides: list[str] = ()) -> Any:
    data = apply_overrides(read_yaml(path), list(overrides))
    names = {f.name for f in dataclasses.fields(cls)}
    if "recipe" in names:
        data.setdefault("recipe", recipe_name(path, data))
    if "run_name" in names and not data.get("run_name"):
        stem = Path(path).stem
        data["run_name"] = stem if stem == data.get("recipe") else f"{data.get('recipe')}-{stem}"
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
