"""The chat-facing model: plan a reply within the context, then stream it. What app.py and the CLI talk to.

`plan()` runs on the caller's thread and does no model work: it decodes and checks the uploads (vision.intake for
images, documents.intake for TXT, Markdown and PDF files, whose text joins the user's message),
asks the family what each image costs in each reading (for the conversation's images together: LLaVA-OneVision
reads an image differently when there are several), and fits the conversation (engine.chat.budget). It never
raises for user input: unreadable images become notices, a message that cannot be answered becomes `Plan.error`.
`stream()` submits the plan to the engine loop (which encodes the images, prefills and decodes) and yields
`Queued` while the request waits, text deltas, and then exactly one `Finished`, whose message explains any ending
but a normal stop in plain words chosen here from the engine's typed finish reasons and error codes; closing the
stream aborts the request in the engine. `astream()` is the same for asyncio callers (the HTTP API, the pipeline),
without `Queued`.

`plan(..., fit=False)` is the strict mode of the HTTP API and the pipeline, which must never change what they were
sent: any unreadable image or document, or a prompt and reply that do not fit, is `Plan.error` (with `error_code`,
and the numbers) instead of a notice.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterator

from documents.intake import DocumentError, DocumentLimits
from engine.chat.budget import FitImage, Item, measure
from engine.chat.budget import fit as _fit  # `fit` is also plan()'s switch
from engine.chat.document_fit import DocumentShelf, FitDocument
from engine.chat.types import ChatTurn, Finished, GenerationSettings, Plan, Queued, TextDelta, TurnStats
from engine.detokenizer import TokenPieces
from engine.families import load_model
from engine.families.base import LoadedModel
from engine.image_inputs import ImageInput
from engine.paging.sequence import ErrorCode, FinishReason, ImageSpan
from engine.sampling_params import SamplingParams
from engine.serving import EngineServer
from vision.intake import ImageError, IntakeLimits, image_digest, load_image

QUEUE_POLL_S = 0.5  # while a reply waits to start, its queue position is re-read this often

REASONS = {
    "length": "The reply reached the max new tokens limit ({n}). Raise the limit in the settings, or ask the "
              "model to continue.",
    "context": "The conversation filled the model's context ({ctx} tokens). Clear the chat or undo a few turns "
               "to go on.",
    "abort": "Stopped.",
}
ERRORS = {
    ErrorCode.CONTEXT_EXCEEDED: "This message is longer than the model's context ({ctx} tokens).",
    ErrorCode.BAD_IMAGE: "An image in this message could not be read by the model, so nothing was answered. Try "
                         "sending it again in another format (JPEG or PNG).",
    ErrorCode.INVALID_PARAMETER: "A setting is out of range; check the values under Settings.",
    ErrorCode.ENGINE: "The model failed while answering this message. The chat is kept; you can retry.",
}


class ChatModel:
    def __init__(self, loaded: LoadedModel, intake_limits: IntakeLimits = IntakeLimits(),
                 document_limits: DocumentLimits = DocumentLimits()):
        self.loaded = loaded
        self.name, self.description = loaded.name, loaded.description
        self.intake_limits, self.document_limits = intake_limits, document_limits
        self.documents = DocumentShelf()
        self.server = EngineServer(loaded.engine)
        # a token's text and bytes, for log-probabilities (GenerationSettings.logprobs)
        self.token_pieces = TokenPieces(loaded.engine.tokenizer)

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, dtype: str = "auto",
             **engine_kw) -> "ChatModel":
        return cls(load_model(model, device, dtype, **engine_kw))

    def close(self) -> None:
        """Stop the engine loop and join its thread (open replies end as stopped)."""
        self.server.close()

    @property
    def context_len(self) -> int:
        return self.loaded.engine.context_len

    @property
    def model_id(self) -> str | None:
        """What `load` takes to load this model again ("default": the embedded one): a name API clients may use."""
        return self.loaded.model_id

    @property
    def vocab_size(self) -> int | None:
        """The token ids a logit bias may name: 0 .. vocab_size - 1."""
        return self.loaded.engine.vocab_size

    @property
    def capacity(self) -> int:
        """Replies the engine runs at once; more wait in its queue (admission by free KV blocks)."""
        return self.loaded.engine.cfg.max_num_seqs

    @property
    def sees_images(self) -> bool:
        return self.loaded.images is not None

    def _decode(self, image) -> FitImage:
        """The upload, decoded and checked (raises ImageError); its readings come from `_read`."""
        return FitImage(image.name, image_digest(image.data), load_image(image.data, image.name, self.intake_limits),
                        [])

    def _read(self, images: list[FitImage], max_image_tokens: int | None) -> None:
        """Each image's readings, for all the images of the prompt together (the family may read an image
        differently when there are several), and the per-image cap."""
        for image, readings in zip(images, self.loaded.images.prompt_readings([im.picture.size for im in images])):
            image.readings = readings
            image.cap(max_image_tokens)

    def _items(self, turns: list[ChatTurn], notices: list[str], max_image_tokens: int | None,
               strict: bool = False) -> list[Item]:
        """Decoded turns; an image or document that cannot be used is a notice, or, with `strict`, an ImageError
        or DocumentError."""
        items = []
        for index, turn in enumerate(turns):
            newest = index == len(turns) - 1
            decoded = []
            for image in turn.images:
                if not self.sees_images:
                    if strict:
                        raise ImageError(f"{image.name} cannot be used: {self.name} reads text only.")
                    if newest:
                        notices.append(f"{image.name} was not used: this model reads text only.")
                    continue
                try:
                    decoded.append(self._decode(image))
                except ImageError as exc:
                    if strict:
                        raise
                    if newest:  # older ones were reported when they were sent
                        notices.append(f"{exc} It was left out.")
            documents = read_documents(turn, self.documents, self.document_limits, notices if newest else [],
                                       strict)
            items.append(Item(turn.role, turn.text, decoded, documents))
        if self.sees_images:
            self._read([im for it in items for im in it.images], max_image_tokens)
        return items

    def plan(self, system: str, turns: list[ChatTurn], max_new_tokens: int | None,
             max_image_tokens: int | None = None, fit: bool = True) -> Plan:
        """`fit=False`: change nothing (see the module docstring); then `max_new_tokens=None` means the rest of
        the context."""
        if fit and max_new_tokens is None:
            raise ValueError("max_new_tokens=None (the rest of the context) needs fit=False")
        notices: list[str] = []
        plan = Plan(turns=list(turns), system=system, max_new_tokens=max_new_tokens or 0,
                    context_len=self.context_len, notices=notices)
        if not turns or turns[-1].role != "user":
            return _refuse(plan, "There is no new message to answer.", ErrorCode.INVALID_PARAMETER)
        try:
            items = self._items(turns, notices, max_image_tokens, strict=not fit)
        except ImageError as exc:
            return _refuse(plan, str(exc), ErrorCode.BAD_IMAGE)
        except DocumentError as exc:
            return _refuse(plan, str(exc), ErrorCode.BAD_DOCUMENT)
        if refuse_unanswerable(plan, turns, items):
            return plan
        if fit:
            fitted = _fit(self.loaded.prompt, system, items, max_new_tokens, self.context_len)
        else:
            fitted = measure(self.loaded.prompt, system, items, max_new_tokens, self.context_len)
        notices.extend(fitted.notices)
        if fitted.error:
            if fitted.prompt is not None:  # the numbers of a strict refusal
                plan.prompt_tokens, plan.max_new_tokens = len(fitted.prompt.ids), fitted.max_new_tokens
                plan.image_tokens = sum(fitted.prompt.image_lengths)
                plan.document_tokens = fitted.document_tokens
            return _refuse(plan, fitted.error, ErrorCode.CONTEXT_EXCEEDED)
        images = [ImageInput(im.picture, im.digest, im.reading, im.name) for it in fitted.items for im in it.images]
        plan.prompt_tokens = len(fitted.prompt.ids)
        plan.image_tokens = sum(fitted.prompt.image_lengths)
        plan.document_tokens = fitted.document_tokens
        plan.max_new_tokens = fitted.max_new_tokens
        plan.prepared = (fitted.prompt.ids, self._spans(fitted.prompt, images))
        return plan

    @staticmethod
    def _spans(prompt, images: list[ImageInput]) -> tuple[ImageSpan, ...]:
        return tuple(ImageSpan(o, n, repr(im.cache_key), source=im)
                     for o, n, im in zip(prompt.image_offsets, prompt.image_lengths, images))

    def plan_raw(self, text: str, images: list, max_new_tokens: int, max_image_tokens: int | None = None) -> Plan:
        """Raw mode (no chat template): `text` marks each image's place with the image token. Raises ValueError
        (ImageError included) for input that cannot run."""
        if images and not self.sees_images:
            raise ValueError(f"{self.name} reads text only: it cannot take images")
        fitted = [self._decode(im) for im in images]
        self._read(fitted, max_image_tokens)
        inputs = [ImageInput(im.picture, im.digest, im.reading, im.name) for im in fitted]
        prompt = self.loaded.prompt.encode(text, [im.reading.tokens for im in inputs])
        return Plan(turns=[], system="", prompt_tokens=len(prompt.ids), image_tokens=sum(prompt.image_lengths),
                    max_new_tokens=max_new_tokens, context_len=self.context_len,
                    prepared=(prompt.ids, self._spans(prompt, inputs)))

    def score(self, sequences: list[list[int]]) -> list[float]:
        """The mean next-token cross-entropy of each token-id sequence (engine scoring requests, all submitted
        before any is read so they batch, alongside whatever chats are running). Lengths are the caller's to check
        (`context_len`); a request the engine refuses or fails raises RuntimeError."""
        requests = [self.server.submit(ids, SamplingParams(), score=True) for ids in sequences]
        try:
            for request in requests:
                for _ in request:  # deltas carry no text; the last one says how it ended
                    pass
        finally:
            for request in requests:
                request.close()
        for i, request in enumerate(requests):
            if request.finish_reason is not FinishReason.STOP:
                detail = request.error.detail if request.error else request.finish_reason.value
                raise RuntimeError(f"sequence {i} could not be scored: {detail}")
        return [request.seq.score.mean for request in requests]

    def stream(self, plan: Plan, settings: GenerationSettings) -> Iterator[TextDelta | Queued | Finished]:
        if plan.error or plan.prepared is None:
            yield self._refused(plan)
            return
        request = self._submit(plan, settings)
        text, shown = [], None
        try:
            while request.finish_reason is None:
                delta = request.get(timeout=QUEUE_POLL_S)
                if delta is None:
                    if (position := request.position) is not None and position != shown:
                        shown = position
                        yield Queued(position)
                    continue
                if delta.text or delta.logprobs:
                    text.append(delta.text)
                    yield TextDelta(delta.text, delta.logprobs)
            yield self._finished(plan, request, "".join(text))
        finally:
            request.close()

    async def astream(self, plan: Plan, settings: GenerationSettings) -> AsyncIterator[TextDelta | Finished]:
        """`stream` for an event loop: the request is submitted at the first `__anext__` (so callers that start
        several tasks at once get them batched), and closing the generator aborts it."""
        if plan.error or plan.prepared is None:
            yield self._refused(plan)
            return
        request = self._submit(plan, settings)
        text = []
        try:
            async for delta in request:
                if delta.text or delta.logprobs:
                    text.append(delta.text)
                    yield TextDelta(delta.text, delta.logprobs)
            yield self._finished(plan, request, "".join(text))
        finally:
            request.close()

    def _refused(self, plan: Plan) -> Finished:
        return Finished(self._stats(plan, 0, 0.0, 0.0, "error", plan.error_code), plan.error or "Nothing to run.")

    def _submit(self, plan: Plan, settings: GenerationSettings):
        ids, spans = plan.prepared
        return self.server.submit(ids, settings.sampling_params(plan.max_new_tokens), spans)

    def _finished(self, plan: Plan, request, text: str) -> Finished:
        stats = request.stats
        code = request.error.code.value if request.error else None
        turn = self._stats(plan, stats.generated_tokens, stats.ttft_s, stats.decode_tokens_per_s,
                           request.finish_reason.value, code)
        return Finished(turn, self._message(turn, text))

    def _stats(self, plan: Plan, generated: int, ttft: float, tps: float, reason: str,
               code: str | None = None) -> TurnStats:
        return TurnStats(prompt_tokens=plan.prompt_tokens, image_tokens=plan.image_tokens,
                         generated_tokens=generated, ttft_s=ttft, decode_tokens_per_s=tps,
                         context_used=plan.prompt_tokens + generated, context_len=plan.context_len,
                         finish_reason=reason, error_code=code, document_tokens=plan.document_tokens)

    @staticmethod
    def _message(stats: TurnStats, text: str) -> str | None:
        if stats.finish_reason == "error":
            words = ERRORS.get(ErrorCode(stats.error_code)) if stats.error_code else None
            return (words or ERRORS[ErrorCode.ENGINE]).format(ctx=stats.context_len)
        if stats.finish_reason in REASONS:
            return REASONS[stats.finish_reason].format(n=stats.generated_tokens, ctx=stats.context_len)
        if not text.strip():
            return ("The model ended its reply at once, without any text. Try Retry (with a higher temperature), "
                    "or rephrase the question.")
        return None


def read_documents(turn: ChatTurn, shelf: DocumentShelf, limits: DocumentLimits, notices: list[str],
                   strict: bool) -> list[FitDocument]:
    """A turn's documents, read (documents.intake, through `shelf`); one that cannot be used is a notice (or, with
    `strict`, a DocumentError), and so is anything the reader should know about one (how it was decoded)."""
    out = []
    for upload in turn.documents:
        try:
            doc = shelf.get(upload.data, upload.name, limits)
        except DocumentError as exc:
            if strict:
                raise
            notices.append(f"{exc} It was left out.")
            continue
        if doc.note:
            notices.append(doc.note)
        out.append(doc)
    return out


def refuse_unanswerable(plan: Plan, turns: list[ChatTurn], items: list[Item]) -> bool:
    """The checks of every chat model before fitting (also engine.chat.remote's): sets `plan.error` and returns
    True when the newest message cannot be sent."""
    if turns[-1].documents and not items[-1].documents:
        # As with images: an answer to the text alone would read as if the document had been read.
        notices = plan.notices
        _refuse(plan, "None of the documents in this message could be read, so it was not sent to the model. "
                + (notices.pop() if len(turns[-1].documents) == 1 and notices else "See the notes above."),
                ErrorCode.BAD_DOCUMENT)
    elif turns[-1].images and not items[-1].images:
        # Answering the text alone would read as if the pictures had been seen.
        notices = plan.notices
        _refuse(plan, "None of the images in this message could be used, so it was not sent to the model. "
                + (notices.pop() if len(turns[-1].images) == 1 and notices else "See the notes above."),
                ErrorCode.BAD_IMAGE)
    elif not items[-1].text.strip() and not items[-1].images and not items[-1].documents:
        _refuse(plan, "Please type a message or add an image or a document.", ErrorCode.INVALID_PARAMETER)
    return plan.error is not None


def _refuse(plan: Plan, error: str, code: ErrorCode) -> Plan:
    plan.error, plan.error_code = error, code.value
    return plan
