"""The Python API, in LMDeploy's shape: `pipe = pipeline(model)`, `pipe(prompts, gen_config=GenerationConfig(...))`.

    from engine import pipeline, GenerationConfig
    with pipeline("default") as pipe:
        print(pipe(("What animal is this?", "cat.jpg")).text)
        for r in pipe(["Hi!", "Name a colour."], gen_config=GenerationConfig(max_new_tokens=32)):
            print(r.index, r.text)

`pipe.get_ppl(input_ids)` scores token-id sequences (LMDeploy's get_ppl): the mean next-token cross-entropy of each,
whose exp is its perplexity; `pipe.tokenizer` encodes text for it.

Prompts: a string; a `(text, image)` or `(text, [images])` tuple; an OpenAI-style conversation (a list of
{"role", "content"}, content a string or parts, engine.chat.messages); or a list of any of those. Images are file
paths, PIL images, bytes or data: URIs (URLs are not fetched). One prompt gives one `Response`, a list gives a list
(with `n` > 1: n Responses per prompt, in order, `index` = prompt * n + choice). Every request is submitted to the
engine before any is read, so a batch runs batched. The chat template is applied; nothing is trimmed to fit: a
prompt that does not fit the context (or an unreadable image) raises ValueError before anything runs.

The module is `pipelines`, not `pipeline`: a submodule named like the function would replace `engine.pipeline`.
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from engine.chat.chat_model import ChatModel
from engine.chat.fan_in import merged
from engine.chat.messages import decode_data_uri, is_data_uri, to_turns
from engine.chat.types import ChatImage, Finished, GenerationSettings, Plan, TextDelta
from engine.sampling_params import SEED_MAX, InvalidParameter


@dataclass(frozen=True)
class GenerationConfig:
    """LMDeploy's fields and defaults: `do_sample=False` is greedy (temperature, top_p, top_k then do not apply)."""

    n: int = 1
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | tuple[str, ...] | None = None
    max_image_tokens: int | None = None
    logprobs: int | None = None  # each token's log-probability with this many alternatives (Response.logprobs)

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidParameter("n", "n must be a whole number >= 1")
        self.settings(self.n - 1)

    def settings(self, choice: int) -> GenerationSettings:
        """The settings of the choice-th answer (seeds random_seed, random_seed + 1, ...)."""
        seed = self.random_seed
        if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= SEED_MAX:  # else refused below
            seed = (seed + choice) % (SEED_MAX + 1)
        try:
            return GenerationSettings(
                max_new_tokens=self.max_new_tokens, temperature=self.temperature if self.do_sample else 0.0,
                top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=seed,
                stop=tuple(self.stop_words or ()), ignore_eos=self.ignore_eos, max_image_tokens=self.max_image_tokens,
                logprobs=self.logprobs)
        except InvalidParameter as exc:
            names = {"seed": "random_seed", "stop": "stop_words"}
            raise InvalidParameter(names.get(exc.param, exc.param), str(exc)) from None


@dataclass
class Response:
    """One answer, or from `stream_infer` one piece of it. `generate_token_len` (tokens generated) and
    `finish_reason` ("stop", "length", "context", "error", ...) come with the whole answer, or with its last
    piece (0 and None before); `error` says why when the reason is "error"."""

    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    index: int = 0
    error: str | None = None
    # with GenerationConfig.logprobs, LMDeploy's shape: per token, {token id: log-probability} of the token and its
    # alternatives (the piece's own tokens, from stream_infer)
    logprobs: list[dict[int, float]] | None = None


@dataclass
class _Job:
    index: int
    plan: Plan
    settings: GenerationSettings
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finished: Finished | None = None


def _logprob_dicts(event: TextDelta) -> list[dict[int, float]]:
    return [{**dict(lp.top), lp.token_id: lp.logprob} for lp in event.logprobs]


class Pipeline:
    def __init__(self, model: ChatModel):
        self.model = model
        self._loop = asyncio.new_event_loop()  # its own thread, so this works inside Jupyter's loop too
        self._thread = threading.Thread(target=self._loop.run_forever, name="pipeline-loop", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
        self.model.close()

    def __call__(self, prompts: Any, gen_config: GenerationConfig | None = None) -> Response | list[Response]:
        config = gen_config or GenerationConfig()
        single, jobs = self._jobs(prompts, config)
        future = asyncio.run_coroutine_threadsafe(self._run(jobs), self._loop)
        try:
            future.result()
        except BaseException:  # Ctrl-C in the caller: stop the engine's work too
            future.cancel()
            raise
        responses = [self._response(job) for job in jobs]
        return responses[0] if single and config.n == 1 else responses

    def stream_infer(self, prompts: Any, gen_config: GenerationConfig | None = None) -> Iterator[Response]:
        """Responses as the text comes: pieces of each answer (told apart by `index`), the last with its
        finish_reason. Leaving the loop early aborts what is still running."""
        config = gen_config or GenerationConfig()
        _, jobs = self._jobs(prompts, config)
        out: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(self._run(jobs, out), self._loop)
        try:
            while (item := out.get()) is not None:
                yield item
            future.result()  # raises what the run raised
        finally:
            future.cancel()

    @property
    def tokenizer(self):
        """The model's (transformers) tokenizer, e.g. for `get_ppl`'s input ids."""
        return self.model.loaded.engine.tokenizer

    def get_ppl(self, input_ids: list[int] | list[list[int]]) -> list[float]:
        """LMDeploy's get_ppl: for each token-id sequence (or the one given), the mean cross-entropy of its tokens
        after the first, each predicted from those before it; the perplexity is its exp. The engine prefills them
        in chunks of its per-step token budget (batched with each other and with running chats), so memory does not
        grow with length beyond the KV cache. Each sequence needs 2 to `context_len` tokens: a longer one raises
        ValueError before anything runs (split it into windows, as `python -m bench.ppl` does)."""
        if input_ids and isinstance(input_ids[0], int):
            input_ids = [input_ids]
        if not input_ids:
            raise ValueError("get_ppl needs at least one sequence of token ids")
        limit, vocab = self.model.context_len, self.model.loaded.engine.model.config.vocab_size
        for i, ids in enumerate(input_ids):
            if not 2 <= len(ids) <= limit:
                raise ValueError(f"sequence {i}: {len(ids)} tokens; get_ppl takes 2 to {limit} (the context)")
            if not all(0 <= t < vocab for t in ids):
                raise ValueError(f"sequence {i}: token ids must lie in the vocabulary, [0, {vocab})")
        return self.model.score([list(ids) for ids in input_ids])

    # -- internals --------------------------------------------------------------------------------------------

    def _jobs(self, prompts: Any, config: GenerationConfig) -> tuple[bool, list[_Job]]:
        single, conversations = _normalize(prompts)
        jobs = []
        for p, conversation in enumerate(conversations):
            plan = self._plan(p, conversation, config)
            jobs += [_Job(p * config.n + j, plan, config.settings(j)) for j in range(config.n)]
        return single, jobs

    def _plan(self, p: int, conversation: list[dict], config: GenerationConfig) -> Plan:
        try:
            system, turns = to_turns(conversation, lambda source, i: _image(source, i, self.model))
        except ValueError as exc:  # InvalidParameter, ImageError
            raise ValueError(f"prompt {p}: {exc}") from None
        plan = self.model.plan(system, turns, config.max_new_tokens, config.max_image_tokens, fit=False)
        if plan.error:
            raise ValueError(f"prompt {p}: {plan.error}")
        return plan

    async def _run(self, jobs: list[_Job], out: queue.Queue | None = None) -> None:
        by_index = {job.index: job for job in jobs}
        streams = {job.index: self.model.astream(job.plan, job.settings) for job in jobs}
        try:
            async with contextlib.aclosing(merged(streams)) as events:
                async for index, event in events:
                    job = by_index[index]
                    if isinstance(event, TextDelta):
                        job.text.append(event.text)
                        job.logprobs += _logprob_dicts(event)
                        if out is not None:
                            out.put(Response(event.text, 0, job.plan.prompt_tokens, None, index,
                                             logprobs=_logprob_dicts(event) if job.settings.logprobs is not None
                                             else None))
                    else:
                        job.finished = event
                        if out is not None:
                            out.put(self._response(job, text=""))
        finally:
            if out is not None:
                out.put(None)

    @staticmethod
    def _response(job: _Job, text: str | None = None) -> Response:
        stats = job.finished.stats if job.finished else None
        reason = stats.finish_reason if stats else "abort"
        return Response(text="".join(job.text) if text is None else text,
                        generate_token_len=stats.generated_tokens if stats else 0,
                        input_token_len=job.plan.prompt_tokens, finish_reason=reason, index=job.index,
                        error=job.finished.message if reason == "error" and job.finished else None,
                        logprobs=(job.logprobs if text is None else []) if job.settings.logprobs is not None else None)


def _normalize(prompts: Any) -> tuple[bool, list[list[dict]]]:
    """(whether one prompt was given, each prompt as an OpenAI-style conversation)."""
    if _is_one(prompts):
        return True, [_conversation(prompts)]
    if isinstance(prompts, list) and prompts:
        return False, [_conversation(p) for p in prompts]
    raise ValueError("prompts must be a string, a (text, image) tuple, a conversation, or a non-empty list of them")


def _is_one(prompt: Any) -> bool:
    return isinstance(prompt, (str, tuple)) or (
        isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0])


def _conversation(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str):
        text, images = prompt
        images = images if isinstance(images, (list, tuple)) else [images]
        parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": parts}]
    if _is_one(prompt) and isinstance(prompt, list):
        return prompt
    raise ValueError(f"a prompt must be a string, a (text, image) tuple or a conversation, not {type(prompt)!r}")


def _image(source: Any, position: int, model: ChatModel) -> ChatImage:
    """A path, a PIL image, bytes or a data: URI -> ChatImage (decoded and checked later, by the chat layer)."""
    max_bytes, name = model.intake_limits.max_bytes, f"image {position + 1}"
    if isinstance(source, bytes):
        return ChatImage(source, name)
    if hasattr(source, "save") and hasattr(source, "size"):  # a PIL image: sent losslessly
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        return ChatImage(buffer.getvalue(), name)
    if is_data_uri(source):
        return ChatImage(decode_data_uri(source, max_bytes, name), name)
    if isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https"):
        raise ValueError(f"{name}: the pipeline does not fetch URLs; download the image and pass its path")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.stat().st_size > max_bytes:
                raise ValueError(f"{path.name} is larger than {max_bytes / 2**20:.1f} MB, the limit")
            return ChatImage(path.read_bytes(), path.name)
        except OSError as exc:
            raise ValueError(f"{path.name}: could not be read ({exc.strerror or exc})") from None
    raise ValueError(f"{name}: an image must be a file path, a PIL image, bytes or a data: URI")


def pipeline(model: str | None = None, device: str | None = None, dtype: str = "auto", **engine_kw) -> Pipeline:
    """Load `model` (a Hub id or local llava-hf folder; "default": the embedded offline model) on the engine."""
    return Pipeline(ChatModel.load(model, device, dtype, **engine_kw))


__all__ = ["GenerationConfig", "Pipeline", "Response", "pipeline"]
