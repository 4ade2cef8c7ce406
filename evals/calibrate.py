"""Calibration benchmark: what the metrics say about known-good and known-bad image sets.

On the real emoji at one size, with two disjoint random halves A and B of N images each:
  floor       A vs B                      (the metric's bias at this N: a yardstick, not a bound)
  noise       A vs B + Gaussian noise     (sigma = 40/255 * 2 in [-1, 1] units, clamped)
  blur        A vs B down to 8 px and back up (bilinear, antialiased)
  duplicates  A vs 100 distinct images of B, each repeated N/100 times in a row
For each: FD-EffNet, KID x 1000, precision, recall (k = 3), and diversity (mean pairwise feature
distance within consecutive groups of 4: for duplicates a group is one image repeated, like a
generator that ignores its noise; for the others, 4 different emoji, an upper reference).
Prompt retrieval with the emoji-align scorer (among all 3,779 captions): B's images against their own
captions vs shuffled ones, and the noised and blurred B against their own captions.

The collapse part (`--only collapse`, merged into an existing JSON under "collapse") calibrates the threshold tau
of `evals.metrics.collapse_rate` from the per-group spread (mean pairwise feature distance) of groups of K = 4:
  distinct        4 different random emoji                       (a generator with full diversity: rate ~0)
  near_copies     1 emoji, 4 copies each with its own Gaussian pixel noise (sigma 0.03 in [-1, 1])
                  (a collapsed generator, whose seeds change only the fine noise: rate ~1)
  tone_variants   4 skin-tone variants of one emoji (same emoji once the U+1F3FB..U+1F3FF modifiers are
                  removed, the default yellow one included): what a good generator may give for "firefighter";
                  must not count as collapse
  shifted_copies  1 emoji, 4 copies each shifted by up to 1 px (edge padding): a diagnostic only, not in the rule
Rule: tau = sqrt(p99(near_copies) * p05(tone_variants)), the geometric mean of the near-copies' upper tail and the
tone variants' lower tail (see `collapse_threshold`).

    python -m evals.calibrate --size 32 --n 1000 --out calib.json
    python -m evals.calibrate --only collapse          # merges "collapse" into evals/calibration_32px.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.errors import DataError

NOISE_SIGMA = 40 / 255 * 2
BLUR_SIZE = 8
DISTINCT = 100
GROUP = 4
COLLAPSE_K = 4
COLLAPSE_GROUPS = 600  # groups per set: percentiles 1 and 99 rest on 6 groups each side
COPY_SIGMA = 0.03  # ~4/255 per pixel: the fine noise a collapsed generator's seeds still change
COPY_SHIFT = 1
COLLAPSE_RESOLUTION = 128
SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF]")


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


# ---- collapse threshold (--only collapse) ----

def calibration_path(size: int = 32) -> Path:
    """The committed calibration JSON of one image size: evals/calibration_<size>px.json."""
    return Path(__file__).resolve().parent / f"calibration_{size}px.json"


def near_copies(images: torch.Tensor, k: int = COLLAPSE_K, sigma: float = COPY_SIGMA, seed: int = 0) -> torch.Tensor:
    """(M, C, H, W) -> (M * k, C, H, W): each image k times in a row, each copy with its own N(0, sigma^2) noise."""
    rep = images.repeat_interleave(k, dim=0)
    return (rep + sigma * torch.randn(rep.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def shifted_copies(images: torch.Tensor, k: int = COLLAPSE_K, shift: int = COPY_SHIFT, seed: int = 0) -> torch.Tensor:
    """(M, C, H, W) -> (M * k, C, H, W): each image k times in a row, each copy moved by (dy, dx) in [-shift, shift]^2
    pixels (drawn per copy), the border filled by replicating the edge."""
    rep = images.repeat_interleave(k, dim=0)
    size = rep.shape[-2:]
    pad = F.pad(rep, (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (len(rep), 2), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.stack([p[:, dy:dy + size[0], dx:dx + size[1]] for p, (dy, dx) in zip(pad, offsets)])


def tone_families(emoji: list[str], k: int = COLLAPSE_K) -> list[list[int]]:
    """Rows grouped by their emoji with the skin-tone modifiers removed, families of at least k rows only."""
    families: dict[str, list[int]] = {}
    for row, char in enumerate(emoji):
        families.setdefault(SKIN_TONES.sub("", char), []).append(row)
    return [rows for rows in families.values() if len(rows) >= k]


def tone_groups(families: list[list[int]], count: int, k: int = COLLAPSE_K, seed: int = 0) -> torch.Tensor:
    """(count, k) rows: families visited in a random order (cycled), k distinct random members of each."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(families), generator=gen).tolist()
    groups = []
    for i in range(count):
        rows = families[order[i % len(order)]]
        groups.append([rows[j] for j in torch.randperm(len(rows), generator=gen)[:k].tolist()])
    return torch.tensor(groups, dtype=torch.long)


def collapse_threshold(copies: torch.Tensor, tones: torch.Tensor) -> float:
    """tau = sqrt(p99(near-copy spreads) * p05(tone-variant spreads)): between the two tails, in ratio terms
    (spreads are positive and their scale grows with the network's feature norm). Where the tails overlap (at 32 px
    the skin of a golfer or of a person in bed is a few pixels, so those variants are near-copies too), tau sits
    inside the overlap and each set pays a few percent."""
    return float((copies.quantile(0.99) * tones.quantile(0.05)).sqrt())


def percentiles(spread: torch.Tensor) -> dict[str, float]:
    return {f"p{q:02d}": round(float(spread.quantile(q / 100)), 4) for q in (1, 5, 25, 50, 75, 95, 99)}


def emoji_column(size: int) -> list[str]:
    import pyarrow.parquet as pq

    from evals.emoji import DATA_ROOT

    return pq.read_table(DATA_ROOT / f"{size}px" / "train.parquet", columns=["emoji"]).column("emoji").to_pylist()


def collapse_spreads(size: int = 32, seed: int = 0, groups: int = COLLAPSE_GROUPS, k: int = COLLAPSE_K,
                     net=None) -> dict[str, torch.Tensor]:
    """Per-group spreads (`evals.metrics.pairwise_spread`) of `groups` groups of each calibration set, (groups,)."""
    from evals.emoji import load_emoji
    from evals.features import EffNetFeatures, features
    from evals.metrics import pairwise_spread

    real = load_emoji(size)
    if groups * k > len(real.captions):
        raise DataError(f"--collapse-groups {groups} needs {groups * k} distinct emoji; "
                        f"the set has {len(real.captions)}: pass a smaller --collapse-groups.")
    net = net or EffNetFeatures(COLLAPSE_RESOLUTION).to(memory_format=torch.channels_last)  # as evals.measure runs it
    order = torch.randperm(len(real.captions), generator=torch.Generator().manual_seed(seed))
    rows = {"distinct": order[:groups * k].view(groups, k),
            "tone_variants": tone_groups(tone_families(emoji_column(size), k), groups, k, seed)}
    needed = torch.cat([r.flatten() for r in rows.values()]).unique()
    with torch.inference_mode():
        where = torch.full((len(real.captions),), -1, dtype=torch.long)
        where[needed] = torch.arange(len(needed))
        feats = features(real.images[needed], net=net)
        out = {key: pairwise_spread(feats[where[r]]) for key, r in rows.items()}
        copied = real.images[order[-groups:]]  # the last rows: disjoint from the distinct groups when 5 * groups <= N
        for key, make in (("near_copies", near_copies), ("shifted_copies", shifted_copies)):
            out[key] = pairwise_spread(features(make(copied, k, seed=seed), net=net).view(groups, k, -1))
    return out


def calibrate_collapse(size: int = 32, seed: int = 0, groups: int = COLLAPSE_GROUPS) -> dict:
    """The "collapse" block: tau from near_copies vs tone_variants, the rate and spread percentiles of every set."""
    t0 = time.time()
    spreads = collapse_spreads(size, seed, groups)
    tau = collapse_threshold(spreads["near_copies"], spreads["tone_variants"])
    return {"tau": tau, "k": COLLAPSE_K, "feature_net": "effnet-lite0", "feature_resolution": COLLAPSE_RESOLUTION,
            "image_size": size, "seed": seed, "groups_per_set": groups,
            "rule": "tau = sqrt(p99(near_copies) * p05(tone_variants)); a prompt is collapsed when the mean pairwise "
                    "L2 distance of its K samples' features is < tau",
            "sets": {"distinct": "K different random emoji (full diversity)",
                     "near_copies": f"one emoji, K copies each + its own Gaussian noise sigma {COPY_SIGMA} in [-1, 1]",
                     "tone_variants": "K skin-tone variants of one emoji (same emoji without U+1F3FB..U+1F3FF)",
                     "shifted_copies": f"one emoji, K copies each shifted by up to {COPY_SHIFT} px (diagnostic)"},
            "separated": bool(spreads["near_copies"].quantile(0.99) < spreads["tone_variants"].quantile(0.05)),
            "rates": {key: float((s < tau).double().mean()) for key, s in spreads.items()},
            "spreads": {key: percentiles(s) for key, s in spreads.items()},
            "versions": versions(), "seconds": round(time.time() - t0, 1)}


def collapse_tau(feature_net: str, resolution: int, image_size: int = 32, k: int | None = None) -> float | None:
    """The committed collapse threshold for these settings, or None when the calibration does not cover them."""
    path = calibration_path(image_size)
    block = json.loads(path.read_text()).get("collapse") if path.is_file() else None
    if not block or (block["feature_net"], block["feature_resolution"]) != (feature_net, resolution):
        return None
    if k is not None and k != block["k"]:
        return None  # the spread of K samples depends on K (few samples, one pair: a noisier mean)
    return float(block["tau"])


def merge_collapse(path: Path, block: dict) -> None:
    """Write `block` under "collapse" in the JSON at path, every other key left as it was."""
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["collapse"] = block
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def format_collapse(block: dict) -> str:
    tails = "apart" if block["separated"] else "overlapping"
    lines = [f"collapse: tau = {block['tau']:.3f} (K = {block['k']}, {block['groups_per_set']} groups per set, "
             f"tails {tails}); {block['rule']}", f"{'set':<16}{'rate':>7}{'p05':>8}{'p50':>8}{'p95':>8}{'p99':>8}"]
    for key, rate in block["rates"].items():
        q = block["spreads"][key]
        lines.append(f"{key:<16}{rate:>7.3f}{q['p05']:>8.2f}{q['p50']:>8.2f}{q['p95']:>8.2f}{q['p99']:>8.2f}")
    return "\n".join(lines)


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
    parser.add_argument("--only", choices=("collapse",), default=None,
                        help="compute only this part and merge it into --out (default evals/calibration_<size>px.json)")
    parser.add_argument("--collapse-groups", type=int, default=COLLAPSE_GROUPS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only == "collapse":
        block = calibrate_collapse(args.size, args.seed, args.collapse_groups)
        print(format_collapse(block))
        merge_collapse(Path(args.out) if args.out else calibration_path(args.size), block)
        return 0
    result = calibrate(args.size, args.n, args.seed, with_retrieval=not args.no_retrieval)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
