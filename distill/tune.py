"""Tuning a consistency student's few-step schedule: which points of its training grid the sampler visits.

`LCMScheduler` spaces k steps evenly over the student's grid of N timesteps and stops well above t = 0 (4 steps on
N = 10: 999, 799, 499, 299). Which points serve a given student best is an empirical question, and cheap to answer:
sampling is a few network calls. `search` is a coordinate descent (a line search per point) over subsets of the
grid that keep the top point (the sampler starts from pure noise), scored by a callable; `tune_student` scores by KID
(`distill.probe.kid`) of a few hundred samples on a frozen network that must not be the eval's judge, so that the
judge's numbers for the tuned sampler stay honest. The result is pinned in the student's sampler spec
(`SamplerSpec.timesteps`), which a pipeline takes as `timesteps=`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Schedule = tuple[int, ...]  # ascending positions on the grid, 0 = its top (t = 999 on N = 10)


def line(schedule: Schedule, i: int, size: int) -> list[Schedule]:
    """`schedule` with point i at every position between its neighbours (the last point: down to the grid's end)."""
    above = schedule[i + 1] if i + 1 < len(schedule) else size
    return [schedule[:i] + (p,) + schedule[i + 1:] for p in range(schedule[i - 1] + 1, above)]


def search(score: Callable[[Schedule], float], start: Schedule, size: int, max_evals: int = 24,
           margin: float = 0.0) -> tuple[Schedule, list[dict]]:
    """Coordinate descent with a line search from `start`: for each point but the first (the top), last point first,
    score it at every position between its neighbours and move it to the best one when that beats the current
    schedule by more than `margin`. Sweeps repeat until one moves nothing or `max_evals` scores are spent. Whole
    lines, not one-position moves: a single position often changes KID by less than its noise.

    Returns (the best schedule, every scored schedule as {"schedule", "score"} in the order scored). Lower is better.
    """
    scores: dict[Schedule, float] = {}
    history: list[dict] = []

    def value(candidate: Schedule) -> float:
        if candidate not in scores:
            scores[candidate] = float(score(candidate))
            history.append({"schedule": candidate, "score": scores[candidate]})
        return scores[candidate]

    best, moved = start, True
    value(start)
    while moved and len(history) < max_evals:
        moved = False
        for i in reversed(range(1, len(best))):
            candidates = line(best, i, size)
            fresh = [c for c in candidates if c not in scores][:max_evals - len(history)]
            champion = min([c for c in candidates if c in scores] + fresh, key=value)
            if value(champion) < value(best) - margin:
                best, moved = champion, True
    return best, history


def grid_and_start(scheduler, grid_size: int, steps: int) -> tuple[list[int], Schedule]:
    """The scheduler's grid of `grid_size` timesteps (descending) and where its own k-step spacing sits on it."""
    scheduler.set_timesteps(grid_size)
    grid = [int(t) for t in scheduler.timesteps]
    scheduler.set_timesteps(steps)
    return grid, tuple(grid.index(int(t)) for t in scheduler.timesteps)


def flow_grid_and_start(schedule, grid_size: int, steps: int) -> tuple[list[float], Schedule]:
    """A flow student's grid of `grid_size` sigmas (descending, as it visits them) and where its default k-step
    sigmas sit on it (`schedule.consistency_times`, the spacing its sampler spec pins by default)."""
    grid = schedule.grid(grid_size).flip(0)
    start = [int((grid - s).abs().argmin()) for s in schedule.consistency_times(steps, grid_size)]
    return [round(float(g), 6) for g in grid], tuple(start)


def pipeline_images(pipe, prompts: list[str], pin: dict, guidance_scale: float, seed: int,
                    batch: int = 64) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] from a pipeline visiting a pinned schedule (`pin`: {"timesteps": [...]} or
    {"sigmas": [...]}, as `SamplerSpec.pinned` gives), conditioned as the teacher's adaptor encodes (SD3 without T5:
    CLIP's token count); batch i draws from seed + i."""
    from distill.families import family_class

    extra = {**family_class(type(pipe), "the pipeline")(pipe, "the pipeline").call_kwargs(), **pin}
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        torch.manual_seed(seed + i)  # pipelines that re-noise from the global generator repeat too
        generator = torch.Generator().manual_seed(seed + i)
        images = pipe(prompts[i:i + batch], num_inference_steps=len(next(iter(pin.values()))), **extra,
                      guidance_scale=guidance_scale, generator=generator, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


def tune_student(folder, pipe, info, steps: list[int], prompts: list[str], real_features: Tensor, features,
                 seed: int = 1, max_evals: int = 24, log=print, flow=None) -> dict:
    """Search each step count's schedule for the consistency student `info` loaded in `pipe`, scored by the KID of
    `len(prompts)` samples (`features`: images -> [B, C], never the judge's) against `real_features`. `flow`: a flow
    student's `FlowSchedule` (its grid is the N flow sigmas of `details["num_ddim_timesteps"]`); None for an
    LCMScheduler student. Pins the best schedules into the sampler spec (timesteps, or sigmas before the shift),
    writes `folder`/student.json, and returns {steps: {"default", "kid_default", "tuned", "kid_tuned",
    "evaluations"}} (timesteps, or the sigmas visited)."""
    from distill.probe import kid

    size = int(info.details["num_ddim_timesteps"]) if flow else info.sampler.max_steps
    found = {}
    for k in steps:
        grid, start = (flow_grid_and_start(flow, size, k) if flow else
                       grid_and_start(info.sampler.build(pipe.scheduler.config), size, k))

        def score(schedule: Schedule, k=k, grid=grid) -> float:
            times = [grid[i] for i in schedule]
            images = pipeline_images(pipe, prompts, _pin(times, flow), info.guidance_scale, seed)
            value = kid(real_features, features(images))
            log(f"[tune] {k} steps at {times}: KID {value:.2f}")
            return value

        best, history = search(score, start, size, max_evals=max_evals)
        found[str(k)] = {"default": [grid[i] for i in start], "kid_default": history[0]["score"],
                         "tuned": [grid[i] for i in best], "kid_tuned": min(h["score"] for h in history),
                         "evaluations": len(history)}
    _save_pins(info, found, flow)
    info.details["tuned_timesteps"] = {"kid_on": getattr(features, "name", str(features)), "samples": len(prompts),
                                       "seed": seed, **found}
    info.save(folder)
    return found


def _pin(times: list, flow) -> dict:
    """A pipeline's pinned-schedule argument for these visited points (a flow pipeline shifts the sigmas it gets)."""
    if flow is None:
        return {"timesteps": list(times)}
    from distill.consistency import unshifted_sigmas

    return {"sigmas": unshifted_sigmas(flow, times)}


def _save_pins(info, found: dict, flow) -> None:
    """The tuned schedules into the spec: every tuned count of a flow student (its sigmas are always pinned), the
    counts that moved of an LCMScheduler student (the others keep the scheduler's own spacing)."""
    if flow is not None:
        info.sampler.sigmas = {**(info.sampler.sigmas or {}),
                               **{k: _pin(v["tuned"], flow)["sigmas"] for k, v in found.items()}}
        return
    pins = {k: v["tuned"] for k, v in found.items() if v["tuned"] != v["default"]}
    info.sampler.timesteps = {**(info.sampler.timesteps or {}), **pins} or None


def tune_source(source, steps: list[int], num_samples: int = 512, reference: str = "emoji:32",
                feature_net: str = "effnet-lite1", resolution: int = 64, seed: int = 1, max_evals: int = 24,
                num_reference: int = 2000, device=None, log=print) -> dict:
    """`distill tune-sampler`: everything checked before a model loads, then `tune_student` on a run folder or a
    LoRA / pipeline export; its student.json is updated in place. The prompts and the `num_reference` real images
    are disjoint rows of `reference`, shuffled by `seed`."""
    from pathlib import Path

    from distill.backbones import check_backbone
    from distill.data import load_image_dataset
    from distill.errors import ConfigError
    from distill.probe import PooledFeatures
    from distill.sampling import check_sample, load_student_pipeline, student_info_folder

    source = Path(source)
    check_backbone(feature_net, "--feature-net")
    info = check_sample(source, steps, source / "tune.png", None)
    flow = info is not None and info.sampler.scheduler == "FlowMatchLCMScheduler"
    if info is None or not (info.sampler.scheduler == "LCMScheduler" or
                            (flow and info.details.get("num_ddim_timesteps"))):
        what = "a plain pipeline" if info is None else f"a {info.sampler.scheduler} student ({info.method})"
        raise ConfigError(f"{source} is {what}: tune-sampler chooses the points of a consistency student's grid "
                          "that its sampler visits; pass an LCM run folder or export.")
    if any(k < 2 for k in steps):
        raise ConfigError(f"--steps {','.join(map(str, steps))}: one step has nothing to choose (it starts at the "
                          "top of the grid); ask for 2 or more.")
    rows = load_image_dataset(reference).shuffle(seed=seed)
    prompts = list(rows.select(range(num_samples))["caption"])
    features = PooledFeatures(feature_net, resolution)
    pipe, info = load_student_pipeline(source, device=device)
    resolution_px = pipe.vae_scale_factor * _sample_size(pipe)
    reals = _images(rows.select(range(num_samples, min(len(rows), num_samples + num_reference))), resolution_px)
    return tune_student(student_info_folder(source), pipe, info, steps, prompts, features(reals), features,
                        seed=seed, max_evals=max_evals, log=log, flow=_flow_schedule(pipe, source) if flow else None)


def _flow_schedule(pipe, source):
    """The FlowSchedule (shift included) the student's pipeline samples on, as its teacher's adaptor reads it."""
    from distill.families import family_class
    from distill.schedule import schedule_for

    family = family_class(type(pipe), str(source))(pipe, str(source))
    return schedule_for(pipe.scheduler, str(source), **family.schedule_kwargs())


def _sample_size(pipe) -> int:
    network = getattr(pipe, "unet", None) or pipe.transformer
    return int(network.config.sample_size)


def _images(rows, resolution: int) -> Tensor:
    """A dataset's images as [B, 3, R, R] in [-1, 1], as training sees them."""
    from distill.data import ImageCaptionDataset

    data = ImageCaptionDataset(rows, resolution, caption_column=None)
    return torch.stack([data[i]["pixel_values"] for i in range(len(data))])
