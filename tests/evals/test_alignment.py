"""The committed emoji-align scorer, its loss and its retrieval ranks."""

import math

import pytest
import torch

from distill.errors import ModelError
from evals.alignment import AlignmentScorer, build_alignment_scorer, clip_loss, heldout_mask, retrieval_ranks
from evals.emoji import load_emoji


@pytest.fixture(scope="module")
def sample():
    """200 random real emoji at 32 px (the size generated images will have)."""
    real = load_emoji(32)
    rows = torch.randperm(len(real.captions), generator=torch.Generator().manual_seed(123))[:200]
    captions = [real.captions[i] for i in rows]
    return real.images[rows], captions, captions[7:] + captions[:7]


@pytest.fixture(scope="module")
def scorer():
    return AlignmentScorer.load()


def test_committed_scorer_ranks_own_captions_far_above_shuffled(scorer, sample):
    images, own, shuffled = sample
    img = scorer.embed_images(images)
    top1, top5 = scorer.retrieval_from_embeddings(img, own)
    shuffled_top1, shuffled_top5 = scorer.retrieval_from_embeddings(img, shuffled)
    assert len(scorer.captions) == 3779 and scorer.bank.shape == (3779, 384)
    assert top1 > 0.6 and top5 > 0.8, (top1, top5)
    assert shuffled_top1 <= 0.01 and shuffled_top5 <= 0.03, (shuffled_top1, shuffled_top5)


def test_score_is_a_per_sample_cosine_higher_for_own_captions(scorer, sample):
    images, own, shuffled = sample
    own_cos, shuffled_cos = scorer.score(images[:40], own[:40]), scorer.score(images[:40], shuffled[:40])
    assert own_cos.shape == (40,) and own_cos.abs().max() <= 1 + 1e-5
    assert own_cos.mean() > shuffled_cos.mean() + 0.2
    assert (own_cos > shuffled_cos).float().mean() > 0.9


def test_retrieval_api_accepts_custom_candidates(scorer, sample):
    images, own, _ = sample
    top1, top5 = scorer.retrieval(images[:5], own[:5], candidate_captions=own[:5])
    assert 0.6 <= top1 <= top5 == 1.0  # among 5 candidates everything is top-5


def test_retrieval_ranks_by_hand():
    bank = torch.eye(3)
    img = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.6, 0.8, 0.0]])
    # image 0 -> own row 0 best; image 1 -> own row 1 (0.6) beaten by row 2 (0.8); image 2 -> prompt absent
    own = torch.stack([bank[0], bank[1], torch.tensor([0.0, 0.0, 1.0])])
    ranks = retrieval_ranks(img, own, bank, torch.tensor([0, 1, -1]))
    assert ranks.tolist() == [0, 1, 2]


def test_clip_loss_is_small_for_matched_pairs_and_symmetric():
    x = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(math.log(100.0))
    assert clip_loss(x, x, scale).shape == (8,)
    assert clip_loss(x, x, scale).mean() < clip_loss(x, x.roll(1, 0), scale).mean()
    torch.testing.assert_close(clip_loss(x, x.flip(0), scale), clip_loss(x.flip(0), x, scale))
    uniform = clip_loss(torch.zeros(8, 16), torch.zeros(8, 16), scale)  # all logits equal: log B
    torch.testing.assert_close(uniform, torch.full((8,), math.log(8)))


def test_heldout_split_is_fixed():
    mask = heldout_mask()
    assert int(mask.sum()) == 378 and torch.equal(mask, heldout_mask())


def test_unknown_or_offline_scorers_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="Unknown alignment scorer"):
        build_alignment_scorer("blip")
    with pytest.raises(ModelError, match="train one"):
        AlignmentScorer.load(tmp_path)
    with pytest.raises(ModelError, match="emoji-align"):
        build_alignment_scorer("clip:openai/clip-vit-base-patch32")
