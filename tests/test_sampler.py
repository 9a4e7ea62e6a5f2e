import torch

from disagg.engine.sampler import sample
from disagg.protocol import SamplingParams


def _logits():
    return torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_and_top_k_1_are_argmax():
    logits = _logits()
    greedy = sample(logits, [SamplingParams(temperature=0)] * 4, [0] * 4)
    assert greedy == logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 4, [0] * 4) == greedy


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = _logits()
    out = sample(logits, [SamplingParams(temperature=0.8, top_p=1e-6)] * 4, [0] * 4)
    assert out == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    logits = _logits()
    p = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2], [p], [7])
    rows = torch.stack([logits[0], logits[1], logits[2], logits[1]])
    batched = sample(rows, [SamplingParams(temperature=1.0), p, SamplingParams(temperature=0), p], [0, 7, 0, 7])
    assert batched[1] == alone[0] and batched[3] == alone[0]
    draws = {sample(logits[1:2], [p], [i])[0] for i in range(30)}
    assert len(draws) > 1  # different output positions draw differently


def test_top_k_restricts_support():
    logits = _logits()
    top3 = set(logits[0].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits[:1], [SamplingParams(temperature=2.0, top_k=3)], [0], generator=g)[0]
             for _ in range(60)}
    assert draws <= top3 and len(draws) > 1


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams(temperature=1.0)], [0], generator=g)[0]] += 1
    expected = torch.softmax(logits[0], -1) * 3000
    assert torch.allclose(counts, expected, rtol=0.1)
