"""Calibration benchmark: what the metrics say about known-good and known-bad image sets.

On the real emoji at one size, with two disjoint random halves A and B of N images each:
  floor       A vs B                      (the best any generator can hope for at this N)
  noise       A vs B + Gaussian noise     (sigma = 40/255 * 2 in [-1, 1] units, clamped)
  blur        A vs B down to 8 px and back up (bilinear, antialiased)
  duplicates  A vs 100 distinct images of B, each repeated N/100 times in a row
For each: FD-EffNet, KID x 1000, precision, recall (k = 3), and diversity (mean pairwise feature
distance within consecutive groups of 4: for duplicates a group is one image repeated, like a
generator that ignores its noise; for the others, 4 different emoji, an upper reference).
Prompt retrieval with the emoji-align scorer (among all 3,779 captions): B's images against their own
captions vs shuffled ones, and the noised and blurred B against their own captions.

    python -m evals.calibrate --size 32 --n 1000 --out calib.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

from distill.errors import DataError

NOISE_SIGMA = 40 / 255 * 2
BLUR_SIZE = 8
DISTINCT = 100
GROUP = 4


def add_noise(images: torch.Tensor, sigma: float = NOISE_SIGMA, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1, 1)


def blur(images: torch.Tensor, low: int = BLUR_SIZE) -> torch.Tensor:
    small = F.interpolate(images, size=(low, low), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False).clamp(-1, 1)


def duplicate_rows(n: int, distinct: int = DISTINCT) -> torch.Tensor:
    """Row indices 0, 0, ..., 1, 1, ...: `distinct` rows repeated (in a row) up to n."""
    return torch.arange(distinct).repeat_interleave(-(-n // distinct))[:n]


def split_halves(total: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if 2 * n > total:
        raise DataError(f"--n {n} needs {2 * n} real images for two disjoint halves; the emoji set has {total}.")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[:n], order[n : 2 * n]


def versions() -> dict[str, str]:
    import torchmetrics
    import transformers

    from distill import offline

    return {"python": platform.python_version(), "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "transformers": transformers.__version__, "effnet_lite0_sha256": offline.EFFNET_LITE0_SHA256,
            "minilm_sha256": offline.MINILM_SHA256, "emoji_align_head_sha256": _head_sha256()}


def _head_sha256() -> str | None:
    from distill.offline import sha256
    from evals.alignment import DEFAULT_DIR, HEAD_FILE

    path = DEFAULT_DIR / HEAD_FILE
    return sha256(str(path)) if path.is_file() else None


def degraded_features(images: torch.Tensor, feats_b: torch.Tensor, seed: int, net) -> dict[str, torch.Tensor]:
    from evals.features import features

    return {"floor": feats_b, "noise": features(add_noise(images, seed=seed), net=net),
            "blur": features(blur(images), net=net), "duplicates": feats_b[duplicate_rows(len(feats_b))]}


def retrieval(sets: dict[str, torch.Tensor], rows_b: torch.Tensor, captions: tuple[str, ...], seed: int) -> dict:
    """emoji-align top-1/top-5 among all 3,779 captions, for B's images (and their noised and blurred
    versions) against their own captions; the held-out part of B; and B against shuffled captions."""
    from evals.alignment import AlignmentScorer, heldout_mask

    scorer = AlignmentScorer.load()
    own = [captions[i] for i in rows_b]
    shift = torch.randint(1, len(own), (1,), generator=torch.Generator().manual_seed(seed)).item()
    held = heldout_mask(len(captions))[rows_b]
    real = scorer.embed_features(sets["floor"])
    cases = {"own": (real, own), "own_heldout": (real[held], [p for p, h in zip(own, held) if h]),
             "shuffled": (real, own[shift:] + own[:shift]),  # every image gets another emoji's caption
             "own_noise": (scorer.embed_features(sets["noise"]), own),
             "own_blur": (scorer.embed_features(sets["blur"]), own)}
    out = {"heldout_count": int(held.sum())}
    for key, (emb, prompts) in cases.items():
        out[f"{key}_top1"], out[f"{key}_top5"] = scorer.retrieval_from_embeddings(emb, prompts)
    return out


def checks(rows: dict[str, dict[str, float]], fd: str, ret: dict[str, float] | None) -> dict[str, bool]:
    """The orderings a sane metric stack must show."""
    out = {}
    for bad in ("noise", "blur", "duplicates"):
        out[f"{fd}: floor < {bad}"] = rows["floor"][fd] < rows[bad][fd]
        out[f"KID: floor < {bad}"] = rows["floor"]["KIDx1000"] < rows[bad]["KIDx1000"]
    out["recall: duplicates < floor"] = rows["duplicates"]["recall"] < rows["floor"]["recall"]
    out["diversity: duplicates < floor"] = rows["duplicates"]["diversity"] < rows["floor"]["diversity"]
    if ret is not None:
        out["retrieval: own top-1 > 10x shuffled"] = ret["own_top1"] > 10 * max(ret["shuffled_top1"], 1e-3)
    return out


def calibrate(size: int = 32, n: int = 1000, seed: int = 0, with_retrieval: bool = True,
              kid_subset_size: int | None = None) -> dict:
    """Run the benchmark and return the JSON-able result (protocol, rows, retrieval, checks)."""
    from evals.emoji import load_emoji
    from evals.features import build_feature_net, features
    from evals.metrics import distribution_metrics, diversity

    t0 = time.time()
    real = load_emoji(size)
    rows_a, rows_b = split_halves(len(real.captions), n, seed)
    net = build_feature_net("effnet-lite0")
    feats_a, feats_b = features(real.images[rows_a], net=net), features(real.images[rows_b], net=net)
    sets = degraded_features(real.images[rows_b], feats_b, seed, net)
    kid_size = kid_subset_size or n // 2
    rows = {}
    for key, fake in sets.items():
        rows[key] = distribution_metrics(feats_a, fake, net.fd_name, kid_subset_size=kid_size, seed=seed)
        usable = len(fake) // GROUP * GROUP
        rows[key]["diversity"] = diversity(fake[:usable].view(-1, GROUP, fake.shape[1]))
    ret = retrieval(sets, rows_b, real.captions, seed) if with_retrieval else None
    protocol = {"feature_net": net.name, "fd_name": net.fd_name, "feature_resolution": net.resolution,
                "image_size": size, "n": n, "seed": seed, "noise_sigma": NOISE_SIGMA, "blur_size": BLUR_SIZE,
                "duplicates_distinct": DISTINCT, "diversity_group": GROUP, "pr_k": 3,
                "kid": {"subsets": 50, "subset_size": kid_size, "kernel": "(x.y/D + 1)^3"},
                "retrieval_scorer": "emoji-align (checkpoints/emoji-align), candidates: all 3,779 captions",
                "versions": versions()}
    return {"protocol": protocol, "rows": rows, "retrieval": ret, "checks": checks(rows, net.fd_name, ret),
            "seconds": round(time.time() - t0, 1)}


def format_table(result: dict) -> str:
    fd = result["protocol"]["fd_name"]
    p = result["protocol"]
    lines = [f"calibration on real emoji at {p['image_size']} px, N = {p['n']} vs {p['n']}, seed {p['seed']}",
             f"{'set':<12}{fd:>11}{'KIDx1000':>16}{'precision':>11}{'recall':>8}{'diversity':>11}"]
    for key, r in result["rows"].items():
        kid_text = f"{r['KIDx1000']:.1f} ± {r['KIDx1000_std']:.1f}"
        lines.append(f"{key:<12}{r[fd]:>11.1f}{kid_text:>16}{r['precision']:>11.3f}{r['recall']:>8.3f}"
                     f"{r['diversity']:>11.2f}")
    if result["retrieval"]:
        r = result["retrieval"]
        lines.append("emoji-align retrieval among all 3,779 captions (top-1 / top-5):")
        for key, label in (("own", "real, own captions"), ("own_heldout", f"held-out ({r['heldout_count']}), own"),
                           ("shuffled", "real, shuffled captions"), ("own_noise", "noised, own captions"),
                           ("own_blur", "blurred, own captions")):
            lines.append(f"  {label:<28}{r[key + '_top1']:>7.3f}{r[key + '_top5']:>8.3f}")
    lines += [f"{'ok ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Calibrate the offline metrics on real emoji.")
    parser.add_argument("--size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--n", type=int, default=1000, help="images per side (2N real images are used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    parser.add_argument("--no-retrieval", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = calibrate(args.size, args.n, args.seed, with_retrieval=not args.no_retrieval)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
