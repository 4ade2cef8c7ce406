"""Which cascades of `--cascade` draft with a given student, built on the already loaded teacher and student."""

from __future__ import annotations

from pathlib import Path

from evals import models
from evals.cascade import CascadeCandidate, parse_cascade


def cascade_for(text: str, source: str, student: models.Candidate, teacher: models.Candidate):
    """The cascade `text` describes when its student is `source`, else None. The teacher refines with DDIM
    (trailing timesteps, no clipping) at the spec's guidance, or the teacher's own guidance when it names none."""
    spec = parse_cascade(text)
    if Path(spec.student).resolve() != Path(source).resolve():
        return None
    refine = models.teacher_candidate(teacher.model, teacher.source, "DDIMScheduler", {"timestep_spacing": "trailing"},
                                      teacher.guidance_scale, "teacher", "teacher, DDIM trailing (refines the draft)")
    return CascadeCandidate.build(spec, student, refine)


def unmatched(cascades: list[str], students: list[str]) -> list[str]:
    """Cascade specs whose student is not among --student (they would silently not run)."""
    paths = {Path(s).resolve() for s in students}
    return [c for c in cascades if Path(parse_cascade(c).student).resolve() not in paths]
