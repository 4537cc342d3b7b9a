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


def reference_adjusted(logits: torch.Tensor, seq: Sequence, pending: int | None) -> torch.Tensor:
    """One row's logits after logit bias, repetition penalty and presence / frequency penalties, in vLLM's order,
    written plainly: the bias through transformers' SequenceBiasLogitsProcessor (one-token sequences), the
    repetition penalty through its RepetitionPenaltyLogitsProcessor, the additive penalties by their formula over
    the reply's tokens (the pending one included)."""
    p = seq.params
    held = seq.token_ids + ([pending] if pending is not None else [])
    scores = logits[None].clone()
    if p.logit_bias:
        scores = warpers.SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})(torch.tensor([held]), scores)
    if p.repetition_penalty != 1.0:
        scores = warpers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([held]), scores)
    reply = seq.output_ids + ([pending] if pending is not None else [])
    for token in set(reply):
        scores[0, token] -= p.frequency_penalty * reply.count(token) + p.presence_penalty
    return scores[0]


PENALISED = [SamplingParams(presence_penalty=0.7), SamplingParams(frequency_penalty=1.5),
             SamplingParams(presence_penalty=-0.4, frequency_penalty=0.6, repetition_penalty=1.3),
             SamplingParams(logit_bias={3: 4.0, 17: -100.0, 40: 0.5}),
             SamplingParams(logit_bias={5: 2.5}, frequency_penalty=2.0, repetition_penalty=0.8),
             SamplingParams()]  # a plain row batched with penalised ones: its logits are left alone


@pytest.mark.parametrize("with_pending", [False, True])
def test_logit_bias_and_penalties_match_their_reference(with_pending):
    """Greedy rows pick the argmax of the reference's logits, in mixed batches, with a reply whose tokens repeat
    and a pending token that may repeat a held one."""
    gen = torch.Generator().manual_seed(11)
    vocab = 64
    for trial in range(40):
        seqs, pending = [], []
        for params in PENALISED:
            prompt = torch.randint(0, vocab, (5,), generator=gen).tolist()
            seq = Sequence(prompt, params)
            for token in torch.randint(0, 12, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen):
                seq.append(int(token))  # small ids: the reply repeats some
            seqs.append(seq)
            pending.append(int(torch.randint(0, 12, (1,), generator=gen)))
        logits = torch.randn(len(seqs), vocab, generator=gen) * 1.5
        want = torch.stack([reference_adjusted(logits[i], s, pending[i] if with_pending else None)
                            for i, s in enumerate(seqs)])
        got = Sampler(torch.device("cpu"))(logits.clone(), seqs, torch.tensor(pending) if with_pending else None)
        assert torch.equal(got, want.argmax(dim=-1)), trial


def test_a_sampled_row_draws_from_its_adjusted_logits():
    """With a temperature, the draws follow softmax(adjusted logits / T) (transformers' warpers on the reference)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(40, generator=gen)
    params = SamplingParams(temperature=0.8, top_k=20, logit_bias={7: 3.0, 8: -2.0}, presence_penalty=1.0,
                            frequency_penalty=0.5, seed=3)
    seq = Sequence([1, 2, 3], params)
    for token in (7, 7, 9, 12):
        seq.append(token)
    want = hf_probs(reference_adjusted(logits, seq, None), params)
    n = 6000
    tokens = draw(Sampler(torch.device("cpu")), logits[None], [seq], n)[:, 0]
    seen = torch.bincount(tokens, minlength=logits.numel()).float() / n
    assert want[tokens].min() > 0
    assert ((seen - want).abs() <= 5 * (want * (1 - want) / n).sqrt() + 5 / n).all()


def test_logprobs_only_for_the_rows_that_ask():
    """Rows without `logprobs` are left out of the log-softmax; the others get their tokens' values and their own
    number of alternatives."""
    from engine.runtime.sampler import model_logprobs

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 50, generator=gen)
    seqs = [Sequence([1], SamplingParams(logprobs=k)) for k in (None, 3, None, 0)]
    assert model_logprobs(logits, [seqs[0], seqs[2]]) is None
    got = model_logprobs(logits, seqs)
    tokens = torch.tensor([5, 6, 7, 8])
    chosen, values, ids = got.pick(tokens)
    want = torch.log_softmax(logits, -1)
    assert got.rows == [1, 3] and torch.allclose(chosen, want[[1, 3], [6, 8]])
    assert torch.allclose(values, want[[1, 3]].topk(3).values) and torch.equal(ids, want[[1, 3]].topk(3).indices)
