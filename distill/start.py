"""Starting a run: the seed, the run folder (a new numbered one, or the one a resume names) and the check that a
resume trains what the run was started with. `distill.engine` re-exports `start_run` and `Run`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from distill import runs
from distill.device import process_state
from distill.errors import ConfigError


@dataclasses.dataclass
class Run:
    """A run folder and the settings every stage of it shares."""

    cfg: object
    dir: Path
    resume: Path | None  # the checkpoint (or run folder) to go on from; None for a new run
    device: torch.device
    changes: list[str] = dataclasses.field(default_factory=list)  # settings a resume changed (allowed explicitly)
    created: bool = False  # this session made the folder
    trained: bool = False  # a training step has run in this session

    @property
    def is_main(self) -> bool:
        return process_state().is_main_process

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, tb) -> None:
        """A start that failed before any training step (a bad teacher path, a config the method refused) leaves no
        numbered folder behind; anything a run has written stays."""
        if kind is not None and self.created and not self.trained and self.is_main and self.dir.is_dir():
            if not any(self.dir.rglob(runs.MARKER)) and not (self.dir / "student").exists():
                import shutil

                shutil.rmtree(self.dir, ignore_errors=True)


def start_run(cfg) -> Run:
    """Seed, then pick the run folder: a new numbered one, or the one `resume_from_checkpoint` names.

    Initial weights drawn from the global generator (LoRA's A, new layers) follow the seed. The main process picks
    the folder; the others are told its path. The config is written once the first stage has loaded its checkpoint.
    """
    from accelerate.utils import broadcast_object_list, set_seed

    check_report_to(cfg.report_to)
    set_seed(cfg.seed)
    state = process_state()
    paths, changes, created = [None, None], [], False
    if state.is_main_process:
        run_dir, checkpoint = runs.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir, cfg.run_name)
        if run_dir is not None:
            changes = _changes_allowed(cfg, run_dir)
            runs.warn_incomplete(checkpoint.parent.parent if checkpoint else run_dir, checkpoint)
        created = run_dir is None
        paths = [str(run_dir or runs.new_run_dir(cfg.output_dir, cfg.run_name)), checkpoint and str(checkpoint)]
    run_dir, checkpoint = broadcast_object_list(paths)
    if state.is_main_process:
        what = f"resuming {checkpoint}" if checkpoint else "new run"
        print(f"run folder: {run_dir} ({what}; config.yaml, logs/, samples/, checkpoints/, student/ and report.json "
              "will be there)", flush=True)
    return Run(cfg, Path(run_dir), None if checkpoint is None else Path(checkpoint), state.device, changes, created)


def _changes_allowed(cfg, run_dir: Path) -> list[str]:
    """The training settings a resume changes; a ConfigError listing them unless `allow_config_change` is set."""
    from distill.config import to_dict

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return []
    import yaml

    changes = runs.config_changes(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg), _defaults(cfg))
    if changes and not getattr(cfg, "allow_config_change", False):
        raise ConfigError(f"Resuming {run_dir} with different training settings ({'; '.join(changes)}): start a new "
                          "run (resume_from_checkpoint=null), or pass allow_config_change=true to go on with them "
                          "(recorded beside the run's config.yaml, which stays as it is).")
    return changes


def _defaults(cfg) -> dict:
    """The config class's own defaults (what a key added after a run began meant for that run)."""
    from distill.config import to_dict

    try:
        return to_dict(type(cfg)())
    except TypeError:  # a config class with required fields: no defaults to assume
        return {}


def check_report_to(value: str) -> None:
    """ConfigError now (before any model loads) unless `value` is a tracker accelerate has here, "all" or "none"."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
    if value in ("all", "none") or value in available:
        return
    known = f"a tracker accelerate knows ({', '.join(LOGGER_TYPE_TO_CLASS)})" if value not in LOGGER_TYPE_TO_CLASS \
        else "installed"
    raise ConfigError(f"report_to={value} is not {known}; installed here: {', '.join(available) or 'none'}, "
                      "or use all / none (pip install the tracker's package to use it).")
