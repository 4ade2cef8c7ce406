"""The command line: help, listing, dry runs, and one-sentence errors without tracebacks."""

from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
import recipes

ROOT = Path(cli.__file__).resolve().parent
ALL_YAML = sorted((ROOT / "recipes" / "configs").rglob("*.yaml"))


def run(*args):
    return CliRunner().invoke(cli.main, list(args))


def test_help_lists_only_implemented_commands_each_with_an_example():
    result = run("--help")
    assert result.exit_code == 0
    for name, command in cli.main.commands.items():
        assert name in result.output
        assert "distill " in (command.help or ""), f"`{name}` help has no example"


@pytest.mark.parametrize("name", sorted(cli.main.commands))
def test_every_command_help_exits_0(name):
    result = run(name, "--help")
    assert result.exit_code == 0, result.output
    assert f"Usage: main {name}" in result.output and "error" not in result.output.lower()


def test_usage_error_keeps_clicks_exit_code():
    result = run("eval", "--no-such-option")
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_yaml_loads_and_validates(path):
    module, cfg = recipes.load(path, [])
    assert cfg.recipe == path.parent.name == module.__name__.split(".")[-1]
    # Every setting in the YAML is commented (conventions: a comment on each setting).
    for line in path.read_text().splitlines():
        if ":" in line and not line.strip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: setting without a comment: {line.strip()}"


def test_dry_run_prints_resolved_config_with_override():
    result = run("train", "teacher/emoji_sd", "seed=7", "unet.snr_gamma=null", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "seed: 7" in result.output and "snr_gamma: null" in result.output


def test_ls_lists_recipes_and_configs():
    result = run("ls")
    assert result.exit_code == 0 and "teacher/emoji_sd" in result.output


@pytest.mark.parametrize("args, words", [
    (["train", "teacher/emoji_sd", "unet.snr_gama=1", "--dry-run"], ["unet.snr_gama", "unet.snr_gamma"]),
    (["train", "teacher/emoji_sd", "seed=x", "--dry-run"], ["seed", "int"]),
    (["train", "no/such", "--dry-run"], ["no/such", "distill ls"]),
])
def test_errors_are_one_sentence_and_exit_2(args, words):
    result = run(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output


def test_unknown_recipe_named(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("recipe: nosuch\n")
    result = run("train", str(path), "--dry-run")
    assert result.exit_code == 2 and "nosuch" in result.output and "teacher" in result.output


def test_debug_shows_traceback_for_user_errors():
    result = CliRunner().invoke(cli.main, ["--debug", "train", "no/such"])
    assert result.exit_code == 2 and "Traceback" in result.output
