"""The sampler against transformers' logits warpers (temperature, top-k, top-p, in generate's order): the tokens it
draws are the ones they keep, at their probabilities, ties at the k-th value included; a seeded row draws the same
tokens whatever else is in the batch (host tensors draw over a row's kept tokens alone: engine/runtime/sampler.py)."""
import pytest
import torch

from engine.paging.sequence import Sequence
from engine.runtime.sampler import Sampler
from engine.sampling_params import SamplingParams

warpers = pytest.importorskip("transformers.generation.logits_process")


def hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' sampling distribution for one row: TemperatureLogitsWarper, TopK, TopP, softmax."""
    scores = logits[None].clone()
    if params.temperature != 1.0:
        scores = warpers.TemperatureLogitsWarper(params.temperature)(None, scores)
    if params.top_k:
        scores = warpers.TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = warpers.TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)[0]


def draw(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], steps: int) -> torch.Tensor:
    """(steps, B) tokens, each step from the same logits."""
    return torch.stack([sampler(logits.clone(), seqs) for _ in range(steps)])


CASES = [SamplingParams(temperature=0.7, top_p=0.9, top_k=50),  # the chat's defaults
         SamplingParams(temperature=1.0, top_k=5),
         SamplingParams(temperature=1.3, top_p=0.5),
         SamplingParams(temperature=1.0)]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
@pytest.mark.parametrize("ties", [False, True])
def test_draws_follow_transformers_warpers(params, ties):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, generator=gen) * 2.5
    if ties:  # bf16 logits: many equal values, some at the k-th
        logits = logits.to(torch.bfloat16).float()
    want = hf_probs(logits, params)
    seqs = [Sequence([1], SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                         seed=5))]
    n = 6000
    tokens = draw(Sampler(torch.device("cpu")), logits[None], seqs, n)[:, 0]
    assert want[tokens].min() > 0, "a token outside transformers' kept set was drawn"
    seen = torch.bincount(tokens, minlength=logits.numel()).float() / n
    sigma = (want * (1 - want) / n).sqrt()
    assert ((seen - want).abs() <= 5 * sigma + 5 / n).all(), "the frequencies are not transformers' probabilities"
    assert (seen - want).abs().sum() / 2 < 0.08  # total variation, over all tokens at once


def test_ties_at_the_kth_value_are_kept():
    logits = torch.tensor([[5.0, 4.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    seqs = [Sequence([1], SamplingParams(temperature=1.0, top_k=3, seed=1))]
    drawn = set(draw(Sampler(torch.device("cpu")), logits, seqs, 400)[:, 0].tolist())
    assert drawn == {0, 1, 2, 3, 4}  # transformers' TopKLogitsWarper keeps every token at the 3rd value


@pytest.mark.parametrize("neighbour", [SamplingParams(temperature=1.0, seed=99),  # no top-k: full-width draw
                                       SamplingParams(temperature=0.9, top_k=200, seed=7),  # a wider top-k
                                       SamplingParams()])  # greedy
@pytest.mark.parametrize("ties", [False, True])
def test_a_seeded_row_draws_the_same_tokens_in_any_batch(neighbour, ties):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1000, generator=gen) * 2
    if ties:  # bf16 logits: equal values among the kept tokens
        logits = logits.to(torch.bfloat16).float()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1234)
    alone = draw(Sampler(torch.device("cpu")), logits[1:], [Sequence([1], params)], 30)[:, 0]
    batched = draw(Sampler(torch.device("cpu")), logits, [Sequence([1], neighbour), Sequence([1], params)], 30)[:, 1]
    assert torch.equal(alone, batched)
    assert len(set(alone.tolist())) > 1  # really sampled
