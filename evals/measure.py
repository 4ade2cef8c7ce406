"""Quality measurement: the feature net and alignment scorer applied batch by batch, and the distribution
metrics of one feature set against the reference (FD, KID x 1000, precision / recall, alignment).

Second judges (`--judges`) are further feature networks applied to the same images in the same pass; they give
FD and KID only, so a judge costs one more forward per image and nothing else.
"""

from __future__ import annotations

import time

import torch

from evals.reference import RealSet


class Measure:
    """Feature net and alignment scorer, applied batch by batch; keeps the time each took."""

    def __init__(self, feature_net: str, alignment: str, device: str, resolution: int = 128,
                 judges: list[str] | tuple = ()):
        self.judges = {name: _judge(name, device, resolution) for name in judges}  # first: they may not load
        self.net = _feature_net(feature_net, device, resolution)
        self.fd_name = self.net.fd_name
        self.scorer = None if alignment == "none" else _scorer(alignment)
        self.seconds = {"features": 0.0, "judges": 0.0, "alignment": 0.0}
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

    def judge_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each second judge's features of the images (the same batch the primary judge just saw)."""
        from evals.features import features

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = {name: features(images, batch_size=64, net=net) for name, net in self.judges.items()}
        self.seconds["judges"] += time.perf_counter() - t0
        return out

    def judge_entries(self) -> list[dict]:
        """The protocol's list of second judges: what each one is and where its weights came from."""
        return [{"name": name, "network": net.name, "fd_name": net.fd_name, "num_features": net.num_features,
                 "feature_resolution": getattr(net, "resolution", 299), "source": net.source()}
                for name, net in self.judges.items()]

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


def _feature_net(name: str, device: str, resolution: int):
    from evals import features

    net = features.build_feature_net(name, resolution)
    if name.startswith("effnet-"):  # channels_last: the same features (1e-5), ~1.6x faster on CPU
        return net.to(device, memory_format=torch.channels_last)
    return net.to(device)


def _judge(name: str, device: str, resolution: int):
    """A second judge's network, loaded before anything is generated: one that cannot be had stops the eval here."""
    from distill.errors import ModelError

    try:
        return _feature_net(name, device, resolution)
    except ModelError as err:
        raise ModelError(f"Judge {name!r} cannot be loaded, so the eval stopped before generating anything: drop it "
                         f"from --judges (effnet-lite1 works offline), or fix this: {err}") from err


def _scorer(name: str):
    from evals.alignment import build_alignment_scorer

    return build_alignment_scorer(name)


def quality(measure: Measure, ref: torch.Tensor, feats: torch.Tensor, kid_size: int, seed: int) -> dict:
    """FD, KID x 1000 (mean, std), precision, recall of one feature set against the reference."""
    from evals.metrics import distribution_metrics

    m = distribution_metrics(ref, feats, measure.fd_name, kid_subset_size=kid_size, k=3, seed=seed)
    return {"fd": m[measure.fd_name], "kid": m["KIDx1000"], "kid_std": m["KIDx1000_std"],
            "precision": m["precision"], "recall": m["recall"]}


def judge_quality(refs: dict[str, torch.Tensor], feats: dict[str, torch.Tensor], kid_size: int,
                  seed: int) -> dict[str, dict]:
    """Per second judge: FD, KID x 1000 (mean, std) of its features of one image set against its reference."""
    from evals.metrics import frechet_distance, kid

    out = {}
    for name, ref in refs.items():
        mean, std = kid(ref, feats[name], subset_size=kid_size, seed=seed)
        out[name] = {"fd": frechet_distance(ref, feats[name]), "kid": mean, "kid_std": std}
    return out


def floor_entry(measure: Measure, real: RealSet, state: dict) -> dict:
    """The floor set against the reference (distribution metrics, on every judge), and against its own captions
    (alignment)."""
    floor_feats = measure.features(real.floor_images)
    floor = quality(measure, state["ref"], floor_feats, state["kid_size"], state["seed"])
    if measure.judges:
        judged = measure.judge_features(real.floor_images)
        floor["judges"] = judge_quality(state["judge_ref"], judged, state["kid_size"], state["seed"])
    if real.floor_captions and measure.scorer is not None:
        floor.update(measure.alignment(measure.embed_images(real.floor_images, floor_feats), real.floor_captions))
    return floor
