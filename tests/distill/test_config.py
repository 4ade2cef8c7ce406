from dataclasses import dataclass, field
from typing import Literal

import pytest

from distill.config import TrainConfig, apply_overrides, from_dict, load_config, save_config, to_dict
from distill.errors import ConfigError


@dataclass
class Inner:
    rank: int = 4
    alpha: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["to_q"])


@dataclass
class Cfg(TrainConfig):
    kind: Literal["full", "lora"] = "full"
    lora: Inner = field(default_factory=Inner)
    note: str | None = None


def write(tmp_path, text, name="model.yaml", recipe_dir="myrecipe"):
    path = tmp_path / recipe_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_load_with_nested_overrides(tmp_path):
    path = write(tmp_path, "teacher: t\nlora:\n  rank: 8\n")
    cfg = load_config(path, Cfg, ["lora.alpha=2", "learning_rate=3e-4", "kind=lora", "lora.targets=[a, b]"])
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 2.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.learning_rate == pytest.approx(3e-4) and cfg.kind == "lora" and cfg.lora.targets == ["a", "b"]
    # The recipe comes from the folder when the YAML has no `recipe:` key; the run name from both.
    assert cfg.recipe == "myrecipe" and cfg.run_name == "myrecipe-model"


def test_yaml_scientific_notation_string_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float key must still accept it.
    cfg = load_config(write(tmp_path, "learning_rate: 1e-4\n"), Cfg)
    assert cfg.learning_rate == pytest.approx(1e-4)


@pytest.mark.parametrize("override, words", [
    ("lora.rnak=3", ["lora.rnak", "lora.rank"]),
    ("learning_rat=1", ["learning_rat", "learning_rate"]),
    ("zzz=1", ["zzz", "Valid keys"]),
])
def test_unknown_key_names_it_and_the_closest(tmp_path, override, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "teacher: t\n"), Cfg, [override])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("override, words", [
    ("seed=abc", ["seed", "int"]),
    ("lora.rank=1.5", ["lora.rank", "int"]),
    ("kind=half", ["kind", "'full'", "'lora'"]),
    ("max_train_steps=true", ["max_train_steps", "int"]),
    ("lora=3", ["lora", "mapping"]),
])
def test_wrong_type_names_key_and_expected_type(tmp_path, override, words):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "teacher: t\n"), Cfg, [override])
    for word in words:
        assert word in str(err.value)


def test_optional_accepts_null_and_value(tmp_path):
    path = write(tmp_path, "teacher: t\nnote: null\nmax_train_minutes: 5\n")
    cfg = load_config(path, Cfg)
    assert cfg.note is None and cfg.max_train_minutes == 5.0


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", Cfg)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"), Cfg)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), Cfg)
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["nokey"])


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "teacher: t\nlora: {rank: 16}\n"), Cfg, ["seed=7"])
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved, Cfg)
    assert to_dict(again) == to_dict(cfg)


def test_from_dict_rejects_unknown_nested_section():
    with pytest.raises(ConfigError, match="lora.extra"):
        from_dict(Cfg, {"lora": {"extra": 1}})
