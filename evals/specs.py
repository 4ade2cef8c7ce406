"""Sampler specs as `distill eval` takes them on the command line: `Class[:key=value,...]@g1,g2`."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from distill.errors import ConfigError


@dataclass
class BaselineSpec:
    scheduler: str
    config: dict = field(default_factory=dict)
    guidances: list[float] = field(default_factory=lambda: [1.0])


def parse_baseline(spec: str) -> BaselineSpec:
    """`Class[:k=v,...]@g1,g2` -> BaselineSpec; a ConfigError naming the expected form otherwise."""
    form = "write e.g. DDIMScheduler:timestep_spacing=trailing@2,3 (class, optional settings, @ guidance scales)"
    head, _, scales = spec.partition("@")
    name, _, settings = head.partition(":")
    try:
        guidances = [float(g) for g in scales.split(",")] if scales else [1.0]
        config = {k.strip(): yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in settings.split(",") if kv)}
    except ValueError as err:
        raise ConfigError(f"Baseline sampler {spec!r} is not of the form Class[:key=value,...]@g1,g2; {form}.") from err
    import diffusers

    if not name or not hasattr(diffusers, name.strip()) or not name.strip().endswith("Scheduler"):
        raise ConfigError(f"Baseline sampler {spec!r} names no diffusers scheduler class; {form}.")
    if any(g < 1 for g in guidances):
        raise ConfigError(f"Baseline sampler {spec!r} has a guidance scale below 1; {form}.")
    return BaselineSpec(name.strip(), config, guidances)


def parse_sampler(text: str):
    """`Class[:k=v,...]@g` -> distill.info.SamplerSpec (the first guidance scale)."""
    from distill.info import SamplerSpec

    spec = parse_baseline(text)
    return SamplerSpec(spec.scheduler, spec.config, spec.guidances[0])
