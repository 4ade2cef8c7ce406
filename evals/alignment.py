"""Prompt alignment for the emoji domain, offline: EffNet image features -> MiniLM sentence space.

CLIP weights cannot be had offline, so this trains a small CLIP-style head (Radford et al. 2021):
a frozen EfficientNet-Lite0 (pooled 1280-d, `evals.features`) feeds a linear/MLP projection into
the frozen MiniLM sentence space (384-d: mean-pooled token states, L2-normalised), trained with
the symmetric InfoNCE loss and a learnable temperature on the 3,779 emoji image/caption pairs
(a fixed 10% of the emoji held out). The head and the embeddings of all 3,779 captions are
committed under `checkpoints/emoji-align/`. It only knows emoji: it is no general CLIP.

    scorer = build_alignment_scorer("emoji-align")   # or "clip:openai/clip-vit-base-patch32" (hub)
    cos = scorer.score(images, prompts)               # images (N, 3, H, W) in [-1, 1] -> (N,)
    top1, top5 = scorer.retrieval(images, prompts)    # rank of each prompt among all captions

Train: `python -m evals.alignment --train --out checkpoints/emoji-align` (seeded; caches features).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ModelError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "emoji-align"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / "outputs" / "cache" / "emoji-align"
HEAD_FILE, BANK_FILE = "head.safetensors", "captions.safetensors"
SCORERS = ("emoji-align", "clip:<model id>")
# The held-out split has its own seed, so that no other seeded split (calibration halves) coincides with it.
HELDOUT_SEED = 7919


def heldout_mask(num: int = 3779, fraction: float = 0.1, seed: int = HELDOUT_SEED) -> torch.Tensor:
    """The fixed validation emoji: a seeded random `fraction` of dataset rows -> (num,) bool."""
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(num, dtype=torch.bool)
    mask[order[: round(fraction * num)]] = True
    return mask


class TextEncoder:
    """MiniLM-L6 sentence embeddings: attention-masked mean of token states, L2-normalised (384-d)."""

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        from distill.offline import minilm_dir

        folder = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.no_grad()
    def encode(self, texts: list[str] | tuple[str, ...], batch_size: int = 128) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            out[idx] = F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
        return out


@lru_cache(maxsize=1)
def text_encoder() -> TextEncoder:
    return TextEncoder()


class AlignmentHead(nn.Module):
    """Standardised 1280-d features -> Linear (hidden=0) or Linear-GELU-Dropout-Linear -> unit 384-d."""

    def __init__(self, in_dim: int = 1280, hidden: int = 1024, out_dim: int = 384, dropout: float = 0.1):
        super().__init__()
        self.config = {"in_dim": in_dim, "hidden": hidden, "out_dim": out_dim, "dropout": dropout}
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        if hidden:
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
            )
        else:
            self.proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj((feats - self.feat_mean) / self.feat_std), dim=-1)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021), per pair.

    logits = exp(s) * img @ txt^T; loss_i = (CE(logits_i, i) + CE(logits^T_i, i)) / 2.
    img, txt: (B, D) unit vectors of matching pairs (row i with row i); returns (B,).
    """
    logits = logit_scale.exp() * img @ txt.T
    target = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def retrieval_ranks(img: torch.Tensor, own: torch.Tensor, bank: torch.Tensor, own_index: torch.Tensor) -> torch.Tensor:
    """How many candidates score above each image's own prompt: 0 is a top-1 hit.

    img: (N, D), own: (N, D) the prompts' embeddings, bank: (C, D) candidates' embeddings,
    own_index: (N,) the prompt's row in the bank (-1 if absent), not counted against it.
    """
    sims = img @ bank.T
    present = own_index >= 0
    sims[present.nonzero().squeeze(1), own_index[present]] = -math.inf
    return (sims > (img * own).sum(-1, keepdim=True)).sum(1)


class _Scorer:
    """Cosine score and caption retrieval on top of `embed_images` / `embed_texts` (unit vectors)."""

    name = "scorer"

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def caption_bank(self, captions: list[str] | tuple[str, ...] | None) -> tuple[tuple[str, ...], torch.Tensor]:
        """Candidate captions and their embeddings; None means all 3,779 emoji captions."""
        if captions is None:
            from evals.emoji import load_emoji

            captions = load_emoji(32).captions
        return tuple(captions), self.embed_texts(list(captions))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-sample cosine between each image (N, 3, H, W) in [-1, 1] and its prompt -> (N,)."""
        return (self.embed_images(images) * self.embed_texts(list(prompts))).sum(-1)

    def retrieval(self, images, prompts, candidate_captions=None) -> tuple[float, float]:
        """Top-1 / top-5 rate of each image's prompt among `candidate_captions` (default: all 3,779 emoji captions).

        A prompt that is itself a candidate is not counted against itself; one that is not is ranked among them.
        """
        return self.retrieval_from_embeddings(self.embed_images(images), prompts, candidate_captions)

    def retrieval_from_embeddings(self, img: torch.Tensor, prompts, candidate_captions=None) -> tuple[float, float]:
        captions, bank = self.caption_bank(candidate_captions)
        where = {c: i for i, c in enumerate(captions)}
        own_index = torch.tensor([where.get(p, -1) for p in prompts], dtype=torch.long)
        ranks = retrieval_ranks(img, self.embed_texts(list(prompts)), bank, own_index)
        return float((ranks < 1).double().mean()), float((ranks < 5).double().mean())


class AlignmentScorer(_Scorer):
    """The committed emoji-align head on EffNet-Lite0 features, with MiniLM on the text side."""

    name = "emoji-align"

    def __init__(self, head: AlignmentHead, captions: tuple[str, ...] = (), bank: torch.Tensor | None = None):
        self.head = head.eval()
        self.captions, self.bank = captions, bank

    @classmethod
    def load(cls, folder: str | Path = DEFAULT_DIR) -> "AlignmentScorer":
        from safetensors.torch import load_file, safe_open

        head_path, bank_path = Path(folder) / HEAD_FILE, Path(folder) / BANK_FILE
        if not head_path.is_file() or not bank_path.is_file():
            raise ModelError(
                f"No emoji-align scorer in {folder}: expected {HEAD_FILE} and {BANK_FILE}; "
                "train one with `python -m evals.alignment --train --out checkpoints/emoji-align`."
            )
        with safe_open(str(head_path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        head = AlignmentHead(**config)
        head.load_state_dict(load_file(str(head_path)))
        with safe_open(str(bank_path), "pt") as f:
            captions = tuple(json.loads(f.metadata()["captions"]))
            bank = f.get_tensor("embeddings").float()
        return cls(head, captions, bank)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(Path(folder) / HEAD_FILE), metadata={"config": json.dumps(self.head.config)})
        # fp16 halves the file; cosine error ~1e-3 only reorders near-ties
        save_file({"embeddings": self.bank.half().contiguous()}, str(Path(folder) / BANK_FILE),
                  metadata={"captions": json.dumps(list(self.captions))})

    @torch.no_grad()
    def embed_features(self, feats: torch.Tensor) -> torch.Tensor:
        """EffNet-Lite0 pooled features (N, 1280) from `evals.features.features` -> (N, 384)."""
        return self.head(feats.float())

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        from evals.features import features

        return self.embed_features(features(images))

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return text_encoder().encode(texts)

    def caption_bank(self, captions=None):
        if captions is None or tuple(captions) == self.captions:
            return self.captions, self.bank
        return super().caption_bank(captions)


class ClipScorer(_Scorer):
    """torchmetrics' CLIPScore model (hub weights) behind the same API; cosine, not 100 x cosine."""

    def __init__(self, model_id: str):
        try:
            from torchmetrics.multimodal.clip_score import CLIPScore

            metric = CLIPScore(model_name_or_path=model_id)
        except Exception as err:  # offline: OSError from the hub client; bad id: ValueError
            raise ModelError(
                f"CLIP model {model_id!r} could not be loaded ({type(err).__name__}): CLIPScore downloads it "
                "from the Hugging Face hub; offline, use the alignment scorer 'emoji-align'."
            ) from err
        self.name = f"clip:{model_id}"
        self.model, self.processor = metric.model.eval(), metric.processor

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.multimodal.clip_score import _get_features

        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        device = next(self.model.parameters()).device
        return F.normalize(_get_features(list(pixels), "image", device, self.model, self.processor).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        from torchmetrics.functional.multimodal.clip_score import _get_features

        device = next(self.model.parameters()).device
        return F.normalize(_get_features(list(texts), "text", device, self.model, self.processor).float(), dim=-1)


def build_alignment_scorer(name: str = "emoji-align") -> _Scorer:
    """'emoji-align' (offline default, committed) or 'clip:<hub model id>' (torchmetrics CLIPScore)."""
    if name == "emoji-align":
        return AlignmentScorer.load()
    if name.startswith("clip:") and len(name) > 5:
        return ClipScorer(name[5:])
    raise ModelError(f"Unknown alignment scorer {name!r}: choose one of {', '.join(SCORERS)}.")


# ---------------------------------------------------------------- training


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: float = 0.08,
            scale: tuple[float, float] = (0.85, 1.05)) -> torch.Tensor:
    """Mild random zoom and shift (N, 3, H, W) in [-1, 1]; edges repeat the (white) border."""
    num = images.shape[0]
    s = torch.empty(num).uniform_(*scale, generator=generator)
    shift = torch.empty(num, 2).uniform_(-max_shift, max_shift, generator=generator)
    theta = torch.zeros(num, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = 1 / s, 1 / s, shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def degrade(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 0.15, low=(12, 24)) -> torch.Tensor:
    """Generator-like flaws on top of `augment`: half the images get light Gaussian noise
    (sigma up to `max_sigma` in [-1, 1] units), the other half a blur (down to `low` px and back)."""
    out = augment(images, generator)
    noisy = torch.rand(len(out), generator=generator) < 0.5
    sigma = torch.rand(len(out), 1, 1, 1, generator=generator) * max_sigma
    out = torch.where(noisy[:, None, None, None], out + sigma * torch.randn(out.shape, generator=generator), out)
    sides = torch.randint(low[0], low[1] + 1, (len(out),), generator=generator)
    for side in sides[~noisy].unique().tolist():
        pick = (~noisy) & (sides == side)
        small = F.interpolate(out[pick], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        out[pick] = F.interpolate(small, size=out.shape[-2:], mode="bilinear", align_corners=False)
    return out.clamp(-1, 1)


def cached_views(
    cache: Path, sizes=(32, 64), augmented: int = 1, degraded: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """EffNet features of every emoji per view: (3779, 1280) each, cached on disk.

    Views: '32', '64' (clean), '<size>-aug<i>' (`augment`), '32-deg<i>' (`degrade`: generated images are 32 px).
    """
    from evals.emoji import load_emoji
    from evals.features import features

    cache.mkdir(parents=True, exist_ok=True)
    views = {}
    for size in sizes:
        degraded_views = [f"{size}-deg{i}" for i in range(degraded if size == 32 else 0)]
        for view in [str(size)] + [f"{size}-aug{i}" for i in range(augmented)] + degraded_views:
            path = cache / f"effnet_{view}.pt"
            if not path.is_file():
                t0 = time.time()
                images = load_emoji(size).images
                gen = torch.Generator().manual_seed(seed * 1000 + size + int(view[-1]) + 100 * ("deg" in view))
                if "aug" in view:
                    images = augment(images, gen)
                elif "deg" in view:
                    images = degrade(images, gen)
                torch.save(features(images), path)
                print(f"cached features of view {view} in {time.time() - t0:.0f} s")
            views[view] = torch.load(path)
    return views


def cached_caption_embeddings(cache: Path, captions: tuple[str, ...]) -> torch.Tensor:
    path = cache / "minilm_captions.pt"
    if path.is_file():
        saved = torch.load(path)
        if tuple(saved["captions"]) == captions:
            return saved["embeddings"]
    embeddings = text_encoder().encode(captions)
    torch.save({"captions": list(captions), "embeddings": embeddings}, path)
    return embeddings


def evaluate(head: AlignmentHead, feats: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 of the rows' own captions among all captions (bank rows are the dataset rows)."""
    with torch.no_grad():
        img = head.eval()(feats[rows])
    ranks = retrieval_ranks(img, bank[rows], bank, rows)
    return {"top1": float((ranks < 1).double().mean()), "top5": float((ranks < 5).double().mean())}


def train(args: argparse.Namespace) -> None:
    from evals.emoji import load_emoji

    t0 = time.time()
    captions = load_emoji(32).captions
    views = cached_views(Path(args.cache), augmented=args.aug_views, degraded=args.degraded_views, seed=args.seed)
    bank = cached_caption_embeddings(Path(args.cache), captions)
    held = heldout_mask(len(captions))
    train_rows, val_rows = (~held).nonzero().squeeze(1), held.nonzero().squeeze(1)
    stack = torch.stack(list(views.values()))  # (V, N, 1280)
    torch.manual_seed(args.seed)  # here, not earlier: loading MiniLM may draw from the global generator
    head = AlignmentHead(hidden=args.hidden, dropout=args.dropout)
    head.feat_mean.copy_(stack[:, train_rows].mean(dim=(0, 1)))
    head.feat_std.copy_(stack[:, train_rows].std(dim=(0, 1)).clamp(min=1e-4))
    print(f"features ready in {time.time() - t0:.0f} s; views {list(views)}; "
          f"train {len(train_rows)}, held out {len(val_rows)}")

    t1 = time.time()
    fit(head, stack, bank, train_rows, args)
    train_s = time.time() - t1
    every = torch.arange(len(captions))
    results = {view: {"heldout": evaluate(head, f, bank, val_rows), "all": evaluate(head, f, bank, every)}
               for view, f in views.items() if "-" not in view}
    results["shuffled_captions_32"] = evaluate_shuffled(head, views["32"], bank, args.seed)
    report = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "hidden": args.hidden, "dropout": args.dropout,
              "views": list(views), "seed": args.seed, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.time() - t0, 1), "temperature": round(1 / head.logit_scale.exp().item(), 4),
              "retrieval": results}
    print(json.dumps(report, indent=1))
    AlignmentScorer(head, captions, bank).save(args.out)  # no timings inside: the file is reproducible
    (Path(args.out) / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")


def evaluate_shuffled(head: AlignmentHead, feats: torch.Tensor, bank: torch.Tensor, seed: int) -> dict[str, float]:
    """The same retrieval with each image paired to another emoji's caption (a chance-level control)."""
    num = feats.shape[0]
    other = (torch.arange(num) + torch.randint(1, num, (num,), generator=torch.Generator().manual_seed(seed))) % num
    with torch.no_grad():
        img = head.eval()(feats)
    ranks = retrieval_ranks(img, bank[other], bank, other)
    return {"top1": float((ranks < 1).double().mean()), "top5": float((ranks < 5).double().mean())}


def fit(head: AlignmentHead, stack: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor, args) -> None:
    """Each epoch sees every training emoji once, in one randomly chosen view (no duplicate captions per batch)."""
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(rows) / args.batch)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warm_cosine = lambda s: min(1, (s + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine)
    for epoch in range(args.epochs):
        head.train()
        order = rows[torch.randperm(len(rows), generator=gen)]
        view = torch.randint(0, stack.shape[0], (len(rows),), generator=gen)
        losses = []
        for b in range(steps_per_epoch):
            idx, v = order[b * args.batch : (b + 1) * args.batch], view[b * args.batch : (b + 1) * args.batch]
            loss = clip_loss(head(stack[v, idx]), bank[idx], head.logit_scale).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                head.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        if (epoch + 1) % max(1, args.epochs // 10) == 0:
            temperature = 1 / head.logit_scale.exp().item()
            print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.3f}, temperature {temperature:.4f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", action="store_true", help="train the head and write it to --out")
    parser.add_argument("--out", default=str(DEFAULT_DIR))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where EffNet/MiniLM features are cached")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--hidden", type=int, default=1024, help="0 for a linear projection")
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--aug-views", type=int, default=1, help="augmented feature views cached per size")
    parser.add_argument("--degraded-views", type=int, default=1, help="noised/blurred 32 px feature views cached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.train:
        parser.error("nothing to do: pass --train")
    train(args)


if __name__ == "__main__":
    main()
