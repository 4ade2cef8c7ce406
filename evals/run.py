"""The eval stage: teacher and students at several step counts, same prompts and seeds, quality and speed.

    distill eval --teacher checkpoints/emoji-sd --student runs/002-lcm-emoji_sd_lora -n 1000 --out outputs/eval

Rows of the report, all generated from the same N prompts with the same per-sample noise:
  teacher@T        the teacher with its own scheduler at its usual steps (T = --teacher-steps), CFG
  teacher@k        the teacher with DDIM (trailing timesteps) at k in --steps, CFG: no distillation
  <student>@k      each student at k steps with its LCMScheduler and the guidance its metadata gives
  real (floor)     N other real images against the reference: the best any generator can score at this N
Quality (`evals.metrics`, `evals.alignment`): FD on the feature net, KID x 1000 (mean, std over subsets),
precision / recall (k = 3), per-prompt diversity, prompt alignment (retrieval among captions, cosine).
Speed (`evals.speed`): batch-1 latency by stage, throughput at --batch-size, peak memory, speedups.
Generated images are turned into features batch by batch and dropped; only a few are kept for the grid.
"""

from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.errors import ConfigError, DataError
from distill.memory import PeakMemory
from evals import models, speed

GRID_PROMPTS = 8


@dataclass
class EvalSettings:
    """What `distill eval` was asked for (its options, one for one)."""

    teacher: str
    out: str
    students: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    teacher_steps: int = 50
    num_samples: int = 1000
    prompts: str | None = None
    reference: str = "emoji:32"
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 64
    guidance_scale: float | None = None
    baseline_guidance: float | None = None
    seed: int = 0
    feature_net: str = "effnet-lite0"
    feature_resolution: int = 128  # EffNet input size; 128 is what evals/calibrate.py uses
    alignment: str = "emoji-align"
    price_per_gpu_hour: float = 2.0
    compile: bool = False
    latency_runs: int = 20
    latency_warmup: int = 3
    diversity_prompts: int = 8
    diversity_samples: int = 4

    def check(self) -> None:
        if self.num_samples < 4:
            raise ConfigError(f"--num-samples {self.num_samples} is too small for FD/KID/precision: use 4 or more.")
        if not self.steps or any(s < 1 for s in self.steps) or self.teacher_steps < 1:
            raise ConfigError("--steps and --teacher-steps must be positive step counts, e.g. --steps 1,2,4,8.")
        if self.batch_size < 1 or self.latency_runs < 1:
            raise ConfigError("--batch-size and --latency-runs must be 1 or more.")
        if self.diversity_samples < 2:
            raise ConfigError("--diversity-samples must be 2 or more (diversity compares samples of one prompt).")
        if self.price_per_gpu_hour < 0:
            raise ConfigError("--price-per-gpu-hour must not be negative.")


def log(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------- prompts and real images
@dataclass
class RealSet:
    """Reference images (paired with the prompts when these are dataset captions) and the disjoint floor set."""

    source: str
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str] | None
    floor_images: torch.Tensor | None
    floor_captions: list[str] | None


def _dataset_rows(source: str) -> tuple[int, callable, list[str] | None]:
    """(row count, rows -> images in [-1, 1], captions or None) of an image dataset source."""
    from evals.emoji import load_emoji

    name, _, size = source.partition(":")
    if name == "emoji":
        data = load_emoji(int(size or 32))
        return len(data.captions), lambda rows: data.images[rows], list(data.captions)
    from distill.data import ImageCaptionDataset, load_image_dataset

    dataset = load_image_dataset(source, "image", None)
    has_captions = "caption" in dataset.column_names
    wrapped = ImageCaptionDataset(dataset, 512, "image", "caption" if has_captions else None, source=source)
    # ImageCaptionDataset resizes to a fixed square; the feature net resizes again, so any size works.
    load = lambda rows: torch.stack([wrapped[int(i)]["pixel_values"] for i in rows])  # noqa: E731
    return len(dataset), load, list(dataset["caption"]) if has_captions else None


def load_real(source: str, n: int, seed: int) -> RealSet | None:
    """N reference rows and N disjoint floor rows, chosen with `seed` as evals.calibrate chooses its halves."""
    from evals.calibrate import split_halves

    if source in ("none", ""):
        return None
    total, load, captions = _dataset_rows(source)
    if n > total:
        raise DataError(f"--num-samples {n} is more than the {total} images of the reference {source}; lower it.")
    if 2 * n <= total:
        ref_rows, floor_rows = split_halves(total, n, seed)
    else:  # no disjoint floor at this N
        ref_rows, floor_rows = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n], None
        log(f"the reference has {total} images, fewer than 2N = {2 * n}: no real-vs-real floor at this N")
    pick = (lambda rows: [captions[int(i)] for i in rows]) if captions else (lambda rows: None)
    return RealSet(source, load(ref_rows), pick(ref_rows), None if floor_rows is None else load(floor_rows),
                   None if floor_rows is None else pick(floor_rows))


def choose_prompts(settings: EvalSettings, real: RealSet | None) -> tuple[list[str], str]:
    """N prompts and a sentence saying where they came from."""
    from distill.data import load_prompts

    n = settings.num_samples
    if settings.prompts:
        lines = load_prompts(settings.prompts)
        prompts = [lines[i % len(lines)] for i in range(n)]
        cycled = " (cycled; each repeat has its own seed)" if len(lines) < n else ""
        return prompts, f"{settings.prompts}: first {min(n, len(lines))} of {len(lines)} prompts{cycled}"
    if real is None or real.captions is None:
        raise ConfigError(f"The reference {settings.reference} has no captions to use as prompts: pass --prompts FILE.")
    return list(real.captions), (f"captions of the {n} reference images of {real.source} "
                                 f"(rows drawn with seed {settings.seed}; the images are the reference set)")


# ------------------------------------------------------------------------------------- features/alignment
class Measure:
    """Feature net and alignment scorer, applied batch by batch; keeps the time each took."""

    def __init__(self, feature_net: str, alignment: str, device: str, resolution: int = 128):
        from evals.features import EffNetFeatures, build_feature_net

        if feature_net == "effnet-lite0":  # channels_last: the same features (1e-5), ~1.6x faster on CPU
            self.net = EffNetFeatures(resolution).to(device, memory_format=torch.channels_last)
        else:
            self.net = build_feature_net(feature_net).to(device)
        self.fd_name = self.net.fd_name
        self.scorer = None if alignment == "none" else _scorer(alignment)
        self.seconds = {"features": 0.0, "alignment": 0.0}
        self.images = 0
        self._texts: dict[tuple, torch.Tensor] = {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from evals.features import features

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = features(images, batch_size=64, net=self.net)
        self.seconds["features"] += time.perf_counter() - t0
        self.images += len(images)
        return out

    def embed_images(self, images: torch.Tensor, feats: torch.Tensor) -> torch.Tensor | None:
        """Alignment-space embeddings; the emoji-align head reuses the EffNet features already computed."""
        if self.scorer is None:
            return None
        t0 = time.perf_counter()
        reuse = getattr(self.scorer, "name", "") == "emoji-align" and getattr(self.net, "name", "") == "effnet-lite0" \
            and getattr(self.net, "resolution", None) == 128
        out = self.scorer.embed_features(feats) if reuse else self.scorer.embed_images(images)
        self.seconds["alignment"] += time.perf_counter() - t0
        return out.float().cpu()

    def texts(self, prompts: list[str]) -> torch.Tensor:
        key = tuple(prompts)
        if key not in self._texts:
            t0 = time.perf_counter()
            self._texts[key] = self.scorer.embed_texts(list(dict.fromkeys(prompts)))
            self.seconds["alignment"] += time.perf_counter() - t0
        unique = list(dict.fromkeys(prompts))
        where = {p: i for i, p in enumerate(unique)}
        return self._texts[key][[where[p] for p in prompts]]

    def alignment(self, embeddings: torch.Tensor, prompts: list[str]) -> dict:
        """Top-1/top-5 retrieval of each image's prompt among the scorer's captions, mean cosine (CLIPScore)."""
        from evals.alignment import retrieval_ranks

        if self.scorer is None:
            return {}
        own = self.texts(prompts)
        captions, bank = self.candidates(prompts)
        where = {c: i for i, c in enumerate(captions)}
        own_index = torch.tensor([where.get(p, -1) for p in prompts], dtype=torch.long)
        ranks = retrieval_ranks(embeddings, own, bank, own_index)
        cos = (embeddings * own).sum(-1)
        out = {"align_top1": float((ranks < 1).double().mean()), "align_top5": float((ranks < 5).double().mean()),
               "align_cos": float(cos.mean())}
        if self.scorer.name.startswith("clip:"):
            out["clip_score"] = float(100 * cos.clamp(min=0).mean())  # torchmetrics' CLIPScore convention
        return out

    def candidates(self, prompts: list[str]):
        """emoji-align: its 3,779 captions. CLIP: the distinct prompts of this eval."""
        if self.scorer.name == "emoji-align":
            return self.scorer.caption_bank(None)
        unique = list(dict.fromkeys(prompts))
        return tuple(unique), self.texts(unique)

    def describe(self) -> str | None:
        if self.scorer is None:
            return None
        if self.scorer.name == "emoji-align":
            return ("emoji-align (checkpoints/emoji-align: EffNet-Lite0 features -> MiniLM space, trained on the "
                    "emoji); retrieval of each image's prompt among all 3,779 emoji captions")
        return f"{self.scorer.name} (CLIPScore = 100 x max(cos, 0)); retrieval among the distinct prompts"


def _scorer(name: str):
    from evals.alignment import build_alignment_scorer

    return build_alignment_scorer(name)


def quality(measure: Measure, ref: torch.Tensor, feats: torch.Tensor, kid_size: int, seed: int) -> dict:
    """FD, KID x 1000 (mean, std), precision, recall of one feature set against the reference."""
    from evals.metrics import distribution_metrics

    m = distribution_metrics(ref, feats, measure.fd_name, kid_subset_size=kid_size, k=3, seed=seed)
    return {"fd": m[measure.fd_name], "kid": m["KIDx1000"], "kid_std": m["KIDx1000_std"],
            "precision": m["precision"], "recall": m["recall"]}


# ------------------------------------------------------------------------------------------- generation
@dataclass
class Generated:
    feats: torch.Tensor
    embeddings: torch.Tensor | None
    grid: torch.Tensor  # the first GRID_PROMPTS images, uint8 (G, H, W, 3)
    clock: dict
    peak: dict
    diversity: float


def encode_all(cand: models.Candidate, prompts: list[str], batch: int) -> tuple[list, float]:
    """Conditioning for every batch of prompts, and the text encoder's ms per image (after the first batch)."""
    conds, times = [], []
    device = cand.model.device
    for start in range(0, len(prompts), batch):
        speed.sync(device)
        t0 = time.perf_counter()
        conds.append(models.encode(cand, prompts[start:start + batch]))
        speed.sync(device)
        times.append((time.perf_counter() - t0, len(prompts[start:start + batch])))
    timed = times[1:] if len(times) > 1 else times
    return conds, 1000 * sum(t for t, _ in timed) / sum(n for _, n in timed)


def generate(cand, steps, prompts, conds, settings, measure, label) -> Generated:
    """N images in batches (same per-sample seeds for every model) -> features and alignment embeddings."""
    from distill.images import to_uint8

    n, batch, device = len(prompts), settings.batch_size, cand.model.device
    clock, feats, embs, grid = speed.StageClock(device), [], [], None
    progress = Ticker(label, n)
    t0, peak = time.perf_counter(), {"mb": 0.0, "kind": ""}
    for b, start in enumerate(range(0, n, batch)):
        idx = range(start, min(n, start + batch))
        gens = models.sample_generators(settings.seed, idx)
        noise = models.initial_noise(cand, gens)
        clock.start_batch(len(idx))
        with PeakMemory(device) as memory:  # the model's own memory: the feature net runs outside
            z = clock.time("loop", models.denoise, cand, steps, conds[b], noise, gens)
            images = clock.time("decode", models.decode, cand, z).cpu()
        peak = {"mb": max(peak["mb"], memory.mb), "kind": memory.kind}
        f = measure.features(images)
        feats.append(f)
        embs.append(measure.embed_images(images, f))
        if grid is None or len(grid) < GRID_PROMPTS:
            kept = to_uint8(images[:GRID_PROMPTS])
            grid = kept if grid is None else np.concatenate([grid, kept])[:GRID_PROMPTS]
        progress.update(idx.stop)
    div = diversity(cand, steps, prompts, settings, measure)
    return Generated(torch.cat(feats), None if embs[0] is None else torch.cat(embs), torch.from_numpy(grid),
                     clock.summary(), peak, div)


class Ticker:
    """'[eval] label: 640/1000 images, 2.2 img/s, ~160 s left' at most every `every` seconds, and when done."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        rate = done / max(now - self.start, 1e-9)
        left = f", ~{(self.total - done) / rate:.0f} s left" if done < self.total else f" in {now - self.start:.0f} s"
        log(f"{self.label}: {done}/{self.total} images, {rate:.1f} img/s{left}")
        self.last = now


def diversity_prompts(prompts: list[str], count: int) -> list[str]:
    return list(dict.fromkeys(prompts))[:count]


def diversity(cand, steps, prompts, settings, measure) -> float:
    """Mean pairwise feature distance among K samples (different seeds) of each of P prompts."""
    from evals.metrics import diversity as metric

    chosen = diversity_prompts(prompts, settings.diversity_prompts)
    k = settings.diversity_samples
    repeated = [p for p in chosen for _ in range(k)]
    feats = []
    for start in range(0, len(repeated), settings.batch_size):
        part = repeated[start:start + settings.batch_size]
        gens = models.sample_generators(settings.seed, range(start, start + len(part)), models.DIVERSITY_STREAM)
        z = models.denoise(cand, steps, models.encode(cand, part), models.initial_noise(cand, gens), gens)
        feats.append(measure.features(models.decode(cand, z).cpu()))
    return metric(torch.cat(feats).view(len(chosen), k, -1))


# ---------------------------------------------------------------------------------------------- the run
def row_entry(cand: models.Candidate, steps: int, gen: Generated, text_ms: float, lat: dict, batch: int) -> dict:
    stage = dict(gen.clock["stage_ms_per_image"], text=text_ms)
    per_image_ms = sum(stage.values())
    return {
        "label": cand.label(steps), "model": cand.name, "role": cand.role, "kind": cand.kind, "steps": steps,
        "scheduler": cand.scheduler_name, "guidance_scale": cand.guidance_scale, "cfg": cand.cfg,
        "guidance_input": cand.guidance_input, "nfe": cand.nfe(steps),
        "speed": {"latency": lat, "batch_size": batch, "stage_ms_per_image": stage,
                  "throughput_img_s": 1000 / per_image_ms, "peak_mem_mb": gen.peak["mb"], "mem_kind": gen.peak["kind"],
                  "generation_s": gen.clock["seconds"], "loop_cv": gen.clock["loop_cv"],
                  "weights_mb": models.weights_mb(cand.model)},
    }


def evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings) -> None:
    """Generate, measure and time every (candidate, steps) of one loaded model; append to rows and grids.

    state["ref"]: the reference features; None with --reference none, when the first row (the teacher at
    its usual steps) becomes the reference.
    """
    t0 = time.perf_counter()
    conds, text_ms = encode_all(group[0][0], prompts, settings.batch_size)
    _add(timings, "text_encode_s", time.perf_counter() - t0)
    for cand, steps in group:
        label = cand.label(steps)
        how = (f"CFG {cand.guidance_scale:g}" if cand.cfg else
               f"guidance input {cand.guidance_scale:g}" if cand.guidance_input else "no CFG")
        log(f"{label}: {len(prompts)} images at batch {settings.batch_size} ({cand.scheduler_name}, {how}, "
            f"NFE {cand.nfe(steps)})")
        gen = generate(cand, steps, prompts, conds, settings, measure, label)
        t1 = time.perf_counter()
        log(f"{label}: batch-1 latency, {settings.latency_runs} runs after {settings.latency_warmup} warm-up")
        lat = speed.latency(cand, steps, prompts[0], settings.latency_runs, settings.latency_warmup, settings.seed)
        _add(timings, "latency_s", time.perf_counter() - t1)
        t2 = time.perf_counter()
        if state["ref"] is None:
            state["ref"] = gen.feats
        row = row_entry(cand, steps, gen, text_ms, lat, settings.batch_size)
        row["quality"] = quality(measure, state["ref"], gen.feats, state["kid_size"], settings.seed)
        row["quality"]["diversity"] = gen.diversity
        if gen.embeddings is not None:
            row["quality"].update(measure.alignment(gen.embeddings, prompts))
        _add(timings, "metrics_s", time.perf_counter() - t2)
        rows.append(row)
        grids.append((label, gen.grid))
        log(f"{label}: {measure.fd_name} {row['quality']['fd']:.1f}, latency p50 {lat['p50_ms']:.1f} ms, "
            f"{row['speed']['throughput_img_s']:.1f} img/s at batch {settings.batch_size}")


def _add(timings: dict, key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def teacher_rows(usual: models.Candidate, baseline: models.Candidate, settings: EvalSettings) -> list[tuple]:
    """The teacher at its usual steps first (it is the speed reference), then the few-step DDIM baseline."""
    same = usual.scheduler_config == baseline.scheduler_config and usual.guidance_scale == baseline.guidance_scale
    return [(usual, settings.teacher_steps)] + [(baseline, k) for k in settings.steps
                                                if not (same and k == settings.teacher_steps)]


def run_eval(settings: EvalSettings) -> dict:
    """Run the whole eval and write the report folder; returns the report dict."""
    from evals import report as report_mod

    settings.check()
    _quiet_loading()
    device = models.check_device(settings.device)
    dtype = models.parse_dtype(settings.dtype, device)
    for source in settings.students:  # fail before the long teacher generation, not after it
        models.check_student(source)
    if settings.compile and device == "cpu":
        log("--compile on CPU: inductor compiles once per new batch shape (minutes); the timings leave warm-up out")
    t_start = time.perf_counter()
    timings: dict = {}

    t0 = time.perf_counter()
    real = load_real(settings.reference, settings.num_samples, settings.seed)
    prompts, prompt_source = choose_prompts(settings, real)
    measure = Measure(settings.feature_net, settings.alignment, device, settings.feature_resolution)
    guidance = settings.guidance_scale if settings.guidance_scale is not None else guidance_from_students(settings)
    timings["setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = {"ref": None, "kid_size": max(2, settings.num_samples // 2), "seed": settings.seed}
    floor = None
    if real is not None:
        log(f"features of {len(real.images)} reference images"
            + (f" and {len(real.floor_images)} floor images" if real.floor_images is not None else ""))
        state["ref"] = measure.features(real.images)
        if real.floor_images is not None:
            floor = floor_entry(measure, real, state)
    timings["real_features_s"] = time.perf_counter() - t0

    rows, grids, model_info = [], [], []
    for source in [None] + list(settings.students):
        t0 = time.perf_counter()
        if source is None:
            log(f"loading teacher {settings.teacher}")
            usual, baseline = models.load_teacher(settings.teacher, device, dtype, guidance,
                                                  settings.baseline_guidance, settings.compile)
            origin = _guidance_origin(settings, guidance)
            log(f"teacher guidance {usual.guidance_scale:g} ({origin})")
            state["image_resolution"] = list(usual.model.resolution())
            state["guidance"] = (f"teacher: CFG {usual.guidance_scale:g} ({origin}); few-step teacher: CFG "
                                 f"{baseline.guidance_scale:g}; students: the guidance their student.json gives "
                                 "(LCM-LoRA: 1, no CFG; full LCM: its guidance input), shown per row")
            group = teacher_rows(usual, baseline, settings)
        else:
            log(f"loading student {source}")
            student = models.load_student(source, settings.teacher, device, dtype, settings.compile)
            _unique_name(student, model_info)
            group = [(student, k) for k in settings.steps]
        _add(timings, "load_s", time.perf_counter() - t0)
        add_models(model_info, [c for c in dict.fromkeys(c for c, _ in group)])
        evaluate_candidate(group, prompts, settings, measure, state, rows, grids, timings)
        for cand in dict.fromkeys(c for c, _ in group):
            models.free(cand)

    report = assemble(settings, device, prompts, prompt_source, real, measure, floor, rows, model_info, state, timings)
    t0 = time.perf_counter()
    grid_png = report_mod.sample_grid_png(grids, prompts[:GRID_PROMPTS], _real_grid(real, prompts))
    report["timings"]["report_s"] = time.perf_counter() - t0
    report["timings"]["total_s"] = time.perf_counter() - t_start
    report_mod.write(report, Path(settings.out), grid_png)
    return report


def _quiet_loading() -> None:
    """No per-file loading bars from diffusers/transformers: the eval prints its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def floor_entry(measure: Measure, real: RealSet, state: dict) -> dict:
    """The floor set against the reference (distribution metrics), and against its own captions (alignment)."""
    floor_feats = measure.features(real.floor_images)
    floor = quality(measure, state["ref"], floor_feats, state["kid_size"], state["seed"])
    if real.floor_captions and measure.scorer is not None:
        floor.update(measure.alignment(measure.embed_images(real.floor_images, floor_feats), real.floor_captions))
    return floor


def guidance_from_students(settings: EvalSettings) -> float | None:
    """The teacher guidance the (first) student was distilled to imitate, from its student.json."""
    from distill.student import INFO_FILE, StudentInfo

    found = []
    for source in settings.students:
        path = Path(source)
        if (path / INFO_FILE).is_file():
            found.append(float(StudentInfo.load(path).teacher_guidance_scale))
        elif path.is_dir() and not (path / "model_index.json").is_file():
            from distill.export import student_folder

            found.append(float(StudentInfo.load(student_folder(path)).teacher_guidance_scale))
    if len(set(found)) > 1:
        log(f"the students imitate different teacher guidance {sorted(set(found))}: the teacher uses the first "
            f"student's, {found[0]:g} (pass --guidance-scale to choose)")
    return found[0] if found else None


def _guidance_origin(settings: EvalSettings, guidance: float | None) -> str:
    if settings.guidance_scale is not None:
        return "--guidance-scale"
    if guidance is not None:
        return "the guidance the students were distilled to imitate, per their student.json"
    return "the pipeline's default; pass --guidance-scale to change it"


def _unique_name(student: models.Candidate, model_info: list[dict]) -> None:
    taken = {m["name"] for m in model_info}
    base, i = student.name, 2
    while student.name in taken:
        student.name, i = f"{base}-{i}", i + 1


def add_models(model_info: list[dict], cands: list[models.Candidate]) -> None:
    """One entry per distinct way of sampling (the teacher's few-step DDIM may be its own scheduler)."""
    for cand in cands:
        entry = _model_entry(cand)
        same = [m for m in model_info if all(m[k] == entry[k] for k in ("name", "source", "scheduler", "guidance_scale"))]
        if same:
            same[0]["description"] += "; also the few-step baseline (no distillation)"
        else:
            model_info.append(entry)


def _model_entry(cand: models.Candidate) -> dict:
    return {"name": cand.name, "role": cand.role, "kind": cand.kind, "source": cand.source,
            "description": cand.description, "scheduler": cand.scheduler_name, "guidance_scale": cand.guidance_scale,
            "cfg": cand.cfg, "guidance_input": cand.guidance_input, "weights_mb": models.weights_mb(cand.model),
            "metadata": {k: v for k, v in cand.metadata.items() if isinstance(v, (str, int, float, bool))}}


def _real_grid(real: RealSet | None, prompts: list[str]) -> torch.Tensor | None:
    """The reference images of the grid's prompts, when the prompts are their captions."""
    from distill.images import to_uint8

    if real is None or real.captions is None or real.captions[:GRID_PROMPTS] != prompts[:GRID_PROMPTS]:
        return None
    return torch.from_numpy(to_uint8(real.images[:GRID_PROMPTS]))


def assemble(settings, device, prompts, prompt_source, real, measure, floor, rows, model_info, state, timings) -> dict:
    """The report dict (see evals/schema.json): protocol, models, rows with speedups and cost, floor."""
    from evals import report as report_mod

    teacher = rows[0]  # the teacher at its usual steps is always generated first
    for row in rows:
        teacher_fd = teacher["quality"]["fd"]  # 0 with --reference none: the teacher is the reference
        row["vs_teacher"] = speed.speedups(row, teacher) | {
            "fd_ratio": row["quality"]["fd"] / teacher_fd if teacher_fd > 1e-6 else None}
        row["cost_usd_per_million"] = speed.cost_per_million(row["speed"]["throughput_img_s"],
                                                             settings.price_per_gpu_hour)
    timings["features_s"] = measure.seconds["features"]
    timings["features_img_s"] = measure.images / max(measure.seconds["features"], 1e-9)
    timings["alignment_s"] = measure.seconds["alignment"]
    report = {
        "schema_version": report_mod.SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("distill") else None,
        "protocol": protocol(settings, device, prompt_source, real, measure, state, len(prompts)),
        "models": model_info, "rows": rows, "floor": floor,
        "timings": {k: float(v) for k, v in timings.items()},
    }
    report["recommendations"] = report_mod.recommend(report)
    return report


def versions() -> dict[str, str]:
    """Library versions and the hashes of the metric networks (as evals/calibrate.py records them), plus diffusers."""
    import diffusers

    from evals.calibrate import versions as metric_versions

    found = {k: v for k, v in metric_versions().items() if v is not None}
    return {"diffusers": diffusers.__version__, **found}


def cpu_name() -> str:
    """The CPU model and how many cores this process may use, e.g. 'Intel(R) Xeon(R) Processor, 2 cores'."""
    import os

    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"


def protocol(settings, device, prompt_source, real, measure, state, n) -> dict:
    device_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name()
    return {
        "n": n, "seed": settings.seed,
        "seeds": f"sample i of every model: torch.Generator().manual_seed(({settings.seed} << 32) + i) on CPU for its "
                 "initial noise and any noise its scheduler draws; diversity samples use a disjoint stream",
        "prompts": prompt_source,
        "reference": None if real is None else {
            "source": real.source, "n": len(real.images), "resolution": list(real.images.shape[-2:]),
            "floor_n": None if real.floor_images is None else len(real.floor_images),
            "rows": f"evals.calibrate.split_halves(total, {n}, seed={settings.seed}): reference = first half, "
                    "floor = second"},
        "reference_note": None if real is not None else "no real images (--reference none): distribution metrics "
                                                         "compare with the teacher's samples at its usual steps",
        "feature_net": getattr(measure.net, "name", settings.feature_net), "fd_name": measure.fd_name,
        "feature_resolution": getattr(measure.net, "resolution", 299),
        "image_resolution": state["image_resolution"], "guidance": state["guidance"],
        "kid": {"subsets": 50, "subset_size": state["kid_size"], "kernel": "(x.y/D + 1)^3", "scale": 1000},
        "precision_recall_k": 3,
        "diversity": {"prompts": settings.diversity_prompts, "samples_per_prompt": settings.diversity_samples,
                      "metric": "mean pairwise feature distance among one prompt's samples, averaged over prompts"},
        "alignment": measure.describe(),
        "teacher": settings.teacher, "teacher_steps": settings.teacher_steps, "steps": list(settings.steps),
        "device": device, "device_name": device_name, "dtype": settings.dtype,
        "threads": torch.get_num_threads(), "batch_size": settings.batch_size, "compile": settings.compile,
        "latency": {"runs": settings.latency_runs, "warmup": settings.latency_warmup, "batch_size": 1},
        "price_per_gpu_hour": settings.price_per_gpu_hour,
        "cost_note": (f"{settings.price_per_gpu_hour:g} USD per GPU hour" if device.startswith("cuda") else
                      f"CPU time on this machine, priced at {settings.price_per_gpu_hour:g} USD per hour as given"),
        "versions": versions(),
        "settings": {k: v for k, v in asdict(settings).items()},
    }
