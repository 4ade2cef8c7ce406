"""The recipe registry: which recipes exist, where their configs are, and how a config becomes (module, config).

    RECIPES["lcm"] == "recipes.lcm"      # imported on first use: a recipe pulls in torch and diffusers

Each recipe module exposes `CONFIG` (its config dataclass) and `main(cfg) -> run_dir`. Its YAML configs live in
recipes/configs/<recipe>/<model>.yaml, the first line a comment saying what the config is for.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from distill.errors import ConfigError

RECIPES = {"add": "recipes.add", "lcm": "recipes.lcm", "teacher": "recipes.teacher", "teacher_sd3": "recipes.teacher_sd3"}
CONFIGS = Path(__file__).resolve().parent / "configs"


def _known() -> str:
    return ", ".join(sorted(RECIPES))


def recipe_module(name: str) -> ModuleType:
    """The module of the recipe `name` (imported now)."""
    if name not in RECIPES:
        raise ConfigError(f"Recipe '{name}' does not exist; recipes: {_known()}.")
    return importlib.import_module(RECIPES[name])


def config_path(spec: str) -> Path:
    """A YAML path, or the short form `<recipe>/<model>` for recipes/configs/<recipe>/<model>.yaml."""
    path = Path(spec)
    if path.is_file():
        return path
    short = CONFIGS / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
    if short.is_file():
        return short
    raise ConfigError(f"Config {spec} does not exist: pass a YAML path or a name from `distill ls` "
                      "(e.g. lcm/emoji_sd_lora).")


def list_configs() -> dict[str, list[tuple[str, str]]]:
    """recipe -> [(config name, the first comment line of its YAML)], both sorted by name."""
    out = {}
    for name in sorted(RECIPES):
        paths = sorted((CONFIGS / name).glob("*.yaml"))
        out[name] = [(p.stem, p.read_text().splitlines()[0].lstrip("# ").strip()) for p in paths]
    return out


def load(path: str | Path, overrides: list[str]) -> tuple[ModuleType, object]:
    """(recipe module, resolved config) for a YAML and its key.sub=value overrides."""
    from distill.config import apply_overrides, load_config, read_yaml, recipe_name

    data = apply_overrides(read_yaml(path), list(overrides))
    name = recipe_name(path, data)
    if name not in RECIPES:
        raise ConfigError(f"Config {path} names recipe '{name}', which does not exist; recipes: {_known()}.")
    module = recipe_module(name)
    return module, load_config(path, module.CONFIG, overrides)


def teacher_maker(teacher: str) -> str | None:
    """The `<recipe>/<model>` config that writes this teacher path (a teacher trained here), if one does."""
    from distill.config import read_yaml

    for path in sorted(CONFIGS.glob("teacher*/*.yaml")):
        data = read_yaml(path)
        if Path(str(data.get("teacher", ""))) == Path(teacher):
            return f"{path.parent.name}/{path.stem}"
    return None
