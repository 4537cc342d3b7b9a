"""Long context: every rope type past the trained length equals transformers (fp32, CPU).

Tiny random Llamas trained for 64 positions, a 100-token prompt and 48 greedy tokens (positions up to 147): the
engine's tokens equal transformers' `generate` for default, linear, dynamic NTK, YaRN and llama3 rope, up to the
first near-tie of transformers' logits. Dynamic NTK also alone, batched with a sequence of another length, over
small prefill chunks, under the engine's `rope_scaling_factor` override, and through the prefix cache (whose blocks
carry the base their keys were rotated with). The tables themselves equal transformers' bit for bit.
"""
import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.checkpoints.reader import Checkpoint
from engine.config import EngineConfig, RopeConfig, TextConfig
from engine.families.common import TEXT_PREFIXES
from engine.llm_engine import LLMEngine
from engine.runtime.rope import attention_factor, dynamic_inverse_frequencies, inverse_frequencies
from engine.sampling_params import SamplingParams
from tests.test_concurrency import clear_prefix
from tests.test_engine_parity import RecordingSampler
from tests.tiny_checkpoints import make_tiny_rope_lm

TRAINED, NEW = 64, 48
THETA = 10000.0
ROPES = {
    "default": {"rope_type": "default", "rope_theta": THETA},
    "linear": {"rope_type": "linear", "rope_theta": THETA, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": THETA, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "llama3": {"rope_type": "llama3", "rope_theta": THETA, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": TRAINED // 2},
}
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_tiny_rope_lm(tmp_path_factory.mktemp(name), rope) for name, rope in ROPES.items()}


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_for(folder, device: str = "cpu", **kw) -> LLMEngine:
    ck = Checkpoint.load(folder)
    cfg = EngineConfig(device=device, dtype="float32", max_model_len=kw.pop("max_model_len", 256), max_num_seqs=4,
                       **kw)
    return LLMEngine(TextConfig.from_dict(ck.config), ck.parts(TEXT_PREFIXES)["text"], None, cfg)


def ours_alone(engine: LLMEngine, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The engine's greedy tokens for one prompt and the logits of each step, (NEW, V)."""
    recorder = RecordingSampler(engine.runner.sampler)
    engine.runner.sampler = recorder
    try:
        tokens = engine.generate([ids], GREEDY)[0].token_ids
    finally:
        engine.runner.sampler = recorder.inner
    return tokens, torch.stack(recorder.seen)


def hf_greedy(folder, ids: list[int], rope_parameters: dict | None = None) -> tuple[list[int], int, torch.Tensor]:
    """transformers' greedy tokens on a fresh model (dynamic NTK keeps state between calls), how many of them are
    clear of a near-tie, and the logits of each step."""
    config = LlamaConfig.from_pretrained(folder)
    if rope_parameters is not None:
        config.rope_parameters = dict(rope_parameters)
    model = LlamaForCausalLM.from_pretrained(folder, config=config).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    logits = torch.cat(out.logits).float()
    return out.sequences[0, len(ids):].tolist(), clear_prefix(logits), logits


def assert_same(ours: list[int], theirs: tuple, our_logits: torch.Tensor | None = None):
    """The same greedy tokens up to transformers' first near-tie, and the same logits there (fp32 rounding): a
    random model may repeat one token, which a wrong rotation could repeat too."""
    tokens, clear, logits = theirs
    assert clear >= NEW // 2, "mostly near-ties: the comparison would say little"
    assert ours[:clear] == tokens[:clear]
    if our_logits is not None:
        assert (our_logits[:clear] - logits[:clear]).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(ROPES))
def test_inverse_frequencies_equal_transformers(checkpoints, name):
    config = LlamaConfig.from_pretrained(checkpoints[name])
    ours = RopeConfig.from_dict(json.loads((checkpoints[name] / "config.json").read_text()))
    init = ROPE_INIT_FUNCTIONS.get(name, LlamaForCausalLM(config).model.rotary_emb.compute_default_rope_parameters)
    inv, scale = init(config)
    assert torch.equal(inverse_frequencies(ours, 16), inv) and attention_factor(ours) == scale
    if name == "dynamic":
        for length in (65, 100, 147, 1000):
            theirs, _ = init(config, seq_len=torch.tensor(length))
            assert torch.equal(dynamic_inverse_frequencies(ours, 16, length), theirs)


@pytest.mark.parametrize("name", ["linear", "dynamic", "yarn", "llama3"])
def test_old_rope_scaling_spelling_parses_the_same(checkpoints, name):
    new = json.loads((checkpoints[name] / "config.json").read_text())
    params = dict(new["rope_parameters"])
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old.update(rope_theta=params.pop("rope_theta"), rope_scaling={"type": params.pop("rope_type"), **params})
    assert RopeConfig.from_dict(old) == RopeConfig.from_dict(new)
    assert RopeConfig.from_dict(new).kind == name


@pytest.mark.parametrize("name", list(ROPES))
def test_greedy_past_the_trained_length_equals_transformers(checkpoints, name):
    ids = prompt(100)
    ours, logits = ours_alone(engine_for(checkpoints[name]), ids)
    assert len(ours) == NEW
    assert_same(ours, hf_greedy(checkpoints[name], ids), logits)


def test_rope_scaling_factor_override_is_dynamic_ntk(checkpoints):
    """EngineConfig.rope_scaling_factor (--rope-scaling-factor) replaces the checkpoint's rope with dynamic NTK."""
    ids = prompt(100, seed=2)
    ours, logits = ours_alone(engine_for(checkpoints["default"], rope_scaling_factor=2.0), ids)
    theirs = hf_greedy(checkpoints["default"], ids, {"rope_type": "dynamic", "rope_theta": THETA, "factor": 2.0})
    assert_same(ours, theirs, logits)
    _, unscaled = ours_alone(engine_for(checkpoints["default"]), ids)
    assert (unscaled - logits).abs().max().item() > 1e-2  # it did change the rotation


def test_dynamic_ntk_batch_each_sequence_its_own_base(checkpoints):
    """A 100-token prompt and a 40-token one (crossing the trained length while it decodes) in one batch: each
    rotates with its own length, as it would alone in transformers."""
    folder = checkpoints["dynamic"]
    prompts = [prompt(100, seed=12), prompt(40, seed=11)]
    outs = engine_for(folder).generate(prompts, GREEDY)
    for ids, out in zip(prompts, outs):
        assert_same(out.token_ids, hf_greedy(folder, ids))


def test_dynamic_ntk_chunked_prefill_uses_the_whole_prompts_base(checkpoints):
    folder = checkpoints["dynamic"]
    ids = prompt(100, seed=5)
    engine = engine_for(folder, max_num_batched_tokens=16)
    steps = []
    launch = engine.runner.launch
    engine.runner.launch = lambda batch, after=None: steps.append(batch.chunks[0].num_tokens) or launch(batch, after)
    ours, logits = ours_alone(engine, ids)
    assert steps[:7] == [16] * 6 + [4]  # a 100-token prompt over 7 steps
    assert_same(ours, hf_greedy(folder, ids), logits)


def cached_then_finish(engine: LLMEngine, ids: list[int], params: SamplingParams = GREEDY):
    """Run one request to the end: (prompt tokens found in the prefix cache, its greedy tokens)."""
    seq = engine.add_request(ids, params)
    engine.step()
    cached = seq.num_cached_tokens  # reset once its blocks are freed
    while engine.has_work():
        engine.step()
    return cached, seq.output_ids


def test_prefix_cache_shares_blocks_only_with_the_same_rotation(checkpoints):
    """Under dynamic NTK a prompt past the trained length rotates all its keys with its own length's base: a
    longer prompt with the same first 96 tokens must not reuse them, a retry of the same prompt may, and so may
    prompts within the trained length among themselves."""
    folder = checkpoints["dynamic"]
    engine = engine_for(folder)
    first = prompt(100, seed=6)
    engine.generate([first], GREEDY)
    longer = first[:96] + prompt(20, seed=7)
    cached, tokens = cached_then_finish(engine, longer)
    assert cached == 0
    assert_same(tokens, hf_greedy(folder, longer))
    cached, tokens = cached_then_finish(engine, first)
    assert cached == 96
    assert_same(tokens, hf_greedy(folder, first))
    short = prompt(40, seed=8)
    engine.generate([short], SamplingParams(max_new_tokens=4))
    assert cached_then_finish(engine, short[:32] + prompt(8, seed=9), SamplingParams(max_new_tokens=4))[0] == 32
    # blocks a sequence decoded past the trained length (each key its own base) serve no longer prompt
    assert cached_then_finish(engine, first + tokens[:20], SamplingParams(max_new_tokens=4))[0] == 0


def test_session_past_the_trained_length_without_scaling_warns_once(checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="engine.llm_engine"):
        assert engine_for(checkpoints["default"], max_model_len=200).max_model_len == 200
        assert engine_for(checkpoints["dynamic"], max_model_len=200).max_model_len == 200
    assert len([r for r in caplog.records if "rope scaling" in r.getMessage()]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_dynamic_ntk_under_cuda_graphs_equals_transformers(checkpoints, overlap):
    """On CUDA: decode and small prefills replay CUDA graphs that read each step's rotary rows from the table's step
    rows; a 100-token and a 40-token prompt decoded together, over 16-token steps, each as transformers alone."""
    folder = checkpoints["dynamic"]
    prompts = [prompt(100, seed=12), prompt(40, seed=11)]
    engine = engine_for(folder, "cuda", max_num_batched_tokens=16, overlap_decode=overlap)
    assert engine.runner.graphs is not None and engine.runner.prefill_graphs is not None
    for ids, out in zip(prompts, engine.generate(prompts, GREEDY)):
        assert_same(out.token_ids, hf_greedy(folder, ids))


@pytest.mark.parametrize("length", [400, 1000, 4097])
def test_passkey_prompt_fills_to_the_length_with_the_key_at_its_depth(length):
    from bench.passkey import FILLER, passkey_prompt

    encode = lambda text: list(text.encode())  # noqa: E731 - one id per byte: lengths are exact
    for depth in (0.0, 0.5, 1.0):
        text = bytes(passkey_prompt(encode, length, 31337, depth)).decode()
        assert length - len(FILLER) < len(text) <= length
        assert text.endswith("What is the pass key? The pass key is") and text.count("31337") == 2
        before = text[:text.index(" The pass key is 31337")].count(FILLER)
        assert before == round(text.count(FILLER) * depth)


def test_block_keys_carry_the_dynamic_rotation_length():
    """Bookkeeping alone (no model): trained length 8, blocks of 4. Blocks rotated with the trained base are shared
    by any prompt; blocks of a 12-token prompt (base of length 12) only by another 12-token prompt."""
    from engine.paging.block_manager import BlockManager
    from engine.paging.sequence import Sequence

    bm = BlockManager(64, 4, dynamic_rope_from=8)

    def admit(ids):
        seq = Sequence(ids, SamplingParams())
        bm.allocate(seq)
        cached = seq.num_cached_tokens
        bm.register_full_blocks(seq, 0, len(seq))
        return cached

    long = list(range(100, 112))
    assert admit(long) == 0
    assert admit(long) == 11  # a retry: all three blocks, the last token recomputed
    assert admit(long + [7, 7, 7, 7]) == 0  # 16 tokens: another base for every key
    short = list(range(200, 207))
    assert admit(short) == 0
    assert admit(short[:4] + [1, 2, 3]) == 4  # both within the trained length: the trained base
    assert admit(short[:4] + list(range(20))) == 0  # a 24-token prompt rotates its first block differently
