"""A chat model that answers through any OpenAI-compatible server: ours (`python -m api`), vLLM, SGLang, LMDeploy,
or replicas behind a router. Same interface as `ChatModel` for the UI (`plan`, `stream`, `name`, `description`,
`context_len`, `capacity`, `intake_limits`, `document_limits`, `sees_images`, `close`), so app.py runs on it
unchanged. Documents are read here (documents.intake) and sent as text in the user's message, wrapped as for a
local model (engine.chat.document_fit), trimmed to fit when the tokenizer is available.

`plan()` decodes and checks the images here (vision.intake, the same limits and messages as a local model) and
fits the conversation to the context exactly when the model's own tokenizer and processor can be loaded locally
(`tokenizer=` a checkpoint folder or a cached Hub id; by default the served model's name is tried, offline):
images are counted by the processor, the prompt by the chat template, and engine.chat.budget fits as for a local
model. Otherwise nothing is counted here, and a conversation the server refuses (context full, an image it cannot
read) ends with the server's reason in plain words. `stream()` posts the conversation, images as data URIs, with
`stream=true` (httpx); closing the stream (Stop) closes the HTTP response, which makes the server abort the reply.
"""
from __future__ import annotations

import io
import json
import time
import urllib.parse
from base64 import b64encode
from typing import Iterator

import httpx
from PIL import Image

from documents.intake import DocumentLimits
from engine.chat.budget import FitImage, Item, fit
from engine.chat.chat_model import ChatModel, read_documents, refuse_unanswerable
from engine.chat.document_fit import DocumentShelf, with_documents
from engine.chat.remote_tokens import LocalCounter
from engine.chat.types import ChatTurn, Finished, GenerationSettings, Plan, TextDelta, TurnStats
from engine.paging.sequence import ErrorCode
from vision.intake import ImageError, IntakeLimits, image_digest, load_image

CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10.0, 600.0  # a long read: a reply may wait in the server's queue


class BackendError(RuntimeError):
    """The server could not be used at start-up (unreachable, no models, refused key)."""


def api_base(url: str) -> str:
    """`http://host:8000` or `http://host:8000/v1` -> `http://host:8000/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class RemoteChatModel:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 tokenizer: str | None = None, intake_limits: IntakeLimits = IntakeLimits(), capacity: int = 64,
                 document_limits: DocumentLimits = DocumentLimits()):
        self.base = api_base(url)
        self.host = urllib.parse.urlsplit(self.base).netloc
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, trust_env=False, timeout=httpx.Timeout(
            READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), limits=httpx.Limits(max_connections=None))
        try:
            self.model, served_len = self._discover(model)
        except BackendError:
            self.client.close()
            raise
        self.counter = LocalCounter.load(tokenizer or self.model)
        self.context_len = served_len or (self.counter.context_len if self.counter else 0)
        self.intake_limits, self.capacity, self.document_limits = intake_limits, capacity, document_limits
        self.documents = DocumentShelf()
        self.name = f"{self.model} (at {self.host})"
        counting = ("Prompts are counted here with the model's own tokenizer and processor." if self.counter else
                    "Its tokenizer is not available here, so the server counts the tokens and says when a "
                    "conversation no longer fits.")
        self.description = f"Replies come from the OpenAI-compatible server at {self.base}. {counting}"

    @property
    def sees_images(self) -> bool:
        return True  # the server says otherwise, in words, if it reads text only

    @property
    def vocab_size(self) -> int | None:
        return None  # not known here: the server checks a logit bias's token ids

    @property
    def token_pieces(self) -> None:
        return None  # log-probabilities are not relayed from the server

    def close(self) -> None:
        self.client.close()

    def _discover(self, model: str | None) -> tuple[str, int | None]:
        """The served model's name and context length from /v1/models (vLLM, SGLang and ours give max_model_len)."""
        try:
            response = self.client.get(f"{self.base}/models", timeout=CONNECT_TIMEOUT_S)
            if response.status_code in (401, 403):
                raise BackendError(f"the model server at {self.base} refused the API key (HTTP "
                                   f"{response.status_code}); check --backend-api-key")
            response.raise_for_status()
            cards = response.json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            if model:
                return model, None
            raise BackendError(f"the model server at {self.base} did not list its models ({exc}); pass the model "
                               "name with --backend-model") from None
        card = next((c for c in cards if c.get("id") == model), None) if model else (cards[0] if cards else None)
        if card is None:
            if model:
                return model, None
            raise BackendError(f"the model server at {self.base} lists no models")
        return card["id"], card.get("max_model_len")

    # -- plan -------------------------------------------------------------------------------------------------

    def plan(self, system: str, turns: list[ChatTurn], max_new_tokens: int,
             max_image_tokens: int | None = None) -> Plan:
        notices: list[str] = []
        plan = Plan(turns=list(turns), system=system, max_new_tokens=max_new_tokens, context_len=self.context_len,
                    notices=notices)
        if not turns or turns[-1].role != "user":
            return _refuse(plan, "There is no new message to answer.", ErrorCode.INVALID_PARAMETER)
        items = self._items(turns, notices)
        if refuse_unanswerable(plan, turns, items):
            return plan
        if self.counter and self.context_len:
            fitted = fit(self.counter.builder, system, items, max_new_tokens, self.context_len)
            notices.extend(fitted.notices)
            if fitted.error:
                return _refuse(plan, fitted.error, ErrorCode.CONTEXT_EXCEEDED)
            items, plan.max_new_tokens = fitted.items, fitted.max_new_tokens
            plan.prompt_tokens = len(fitted.prompt.ids)
            plan.image_tokens = sum(fitted.prompt.image_lengths)
            plan.document_tokens = fitted.document_tokens
        plan.prepared = _messages(system, items, self.counter.builder.tokenizer if self.counter else None)
        return plan

    def _items(self, turns: list[ChatTurn], notices: list[str]) -> list[Item]:
        items = []
        for index, turn in enumerate(turns):
            images = []
            for image in turn.images:
                try:
                    picture = load_image(image.data, image.name, self.intake_limits)
                except ImageError as exc:
                    if index == len(turns) - 1:  # older ones were reported when they were sent
                        notices.append(f"{exc} It was left out.")
                    continue
                readings = self.counter.readings(picture) if self.counter else []
                # `picture` keeps the bytes as sent: they go to the server as they are (a data URI)
                images.append(FitImage(image.name, image_digest(image.data), image, readings))
            documents = read_documents(turn, self.documents, self.document_limits,
                                       notices if index == len(turns) - 1 else [], False)
            items.append(Item(turn.role, turn.text, images, documents))
        return items

    # -- stream -----------------------------------------------------------------------------------------------

    def stream(self, plan: Plan, settings: GenerationSettings) -> Iterator[TextDelta | Finished]:
        if plan.error or plan.prepared is None:
            yield Finished(self._stats(plan, 0, 0.0, 0.0, "error", plan.error_code), plan.error or "Nothing to run.")
            return
        started, first, generated, usage, reason = time.perf_counter(), None, 0, None, None
        text = []
        try:
            with self.client.stream("POST", f"{self.base}/chat/completions", json=self._body(plan, settings)) as r:
                if r.status_code != 200:
                    yield self._http_refusal(plan, r)
                    return
                for chunk in _sse_chunks(r):
                    if chunk.get("error"):
                        yield self._failed(plan, chunk["error"], 200)
                        return
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        if content := (choice.get("delta") or {}).get("content"):
                            first = first or time.perf_counter()
                            generated += 1
                            text.append(content)
                            yield TextDelta(content)
                        reason = choice.get("finish_reason") or reason
        except httpx.HTTPError as exc:
            yield Finished(self._stats(plan, generated, 0.0, 0.0, "error", ErrorCode.ENGINE.value),
                           f"The model server at {self.host} could not be reached or stopped answering "
                           f"({type(exc).__name__}). The chat is kept; you can retry.")
            return
        if reason is None:
            yield Finished(self._stats(plan, generated, 0.0, 0.0, "error", ErrorCode.ENGINE.value),
                           f"The model server at {self.host} ended the reply without saying why (no finish reason). "
                           "The chat is kept; you can retry.")
            return
        yield self._done(plan, usage, generated, started, first, reason, "".join(text))

    def _body(self, plan: Plan, settings: GenerationSettings) -> dict:
        body = {"model": self.model, "messages": plan.prepared, "max_tokens": plan.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "stream": True,
                "stream_options": {"include_usage": True}}
        if settings.top_k:  # extra fields, as vLLM, SGLang, LMDeploy and ours take them; left out at defaults
            body["top_k"] = settings.top_k
        if settings.repetition_penalty != 1.0:
            body["repetition_penalty"] = settings.repetition_penalty
        if settings.presence_penalty:  # OpenAI's own fields, also left out at their defaults
            body["presence_penalty"] = settings.presence_penalty
        if settings.frequency_penalty:
            body["frequency_penalty"] = settings.frequency_penalty
        if settings.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in settings.logit_bias}
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.ignore_eos:
            body["ignore_eos"] = True
        return body

    def _done(self, plan, usage, generated, started, first, reason, text) -> Finished:
        usage = usage or {}
        generated = usage.get("completion_tokens", generated)
        prompt_tokens = usage.get("prompt_tokens") or plan.prompt_tokens
        if reason == "length" and self.context_len and prompt_tokens + generated >= self.context_len:
            reason = "context"
        reason = reason if reason in ("stop", "length", "context", "abort") else "stop"
        now = time.perf_counter()
        tps = (generated - 1) / max(now - first, 1e-9) if first and generated > 1 else 0.0
        stats = self._stats(plan, generated, (first or now) - started, tps, reason, prompt_tokens=prompt_tokens)
        return Finished(stats, ChatModel._message(stats, text))

    def _stats(self, plan: Plan, generated: int, ttft: float, tps: float, reason: str, code: str | None = None,
               prompt_tokens: int | None = None) -> TurnStats:
        prompt = plan.prompt_tokens if prompt_tokens is None else prompt_tokens
        return TurnStats(prompt_tokens=prompt, image_tokens=plan.image_tokens, generated_tokens=generated,
                         ttft_s=ttft, decode_tokens_per_s=tps, context_used=prompt + generated,
                         context_len=self.context_len, finish_reason=reason, error_code=code,
                         document_tokens=plan.document_tokens)

    def _http_refusal(self, plan: Plan, response: httpx.Response) -> Finished:
        try:
            error = json.loads(response.read()).get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        return self._failed(plan, error if isinstance(error, dict) else {"message": str(error)}, response.status_code)

    def _failed(self, plan: Plan, error: dict, status: int) -> Finished:
        """The server's refusal, in plain words that say what to do."""
        message = str(error.get("message") or f"HTTP {status}").strip()
        code = str(error.get("code") or "")
        if code == "context_length_exceeded" or "context length" in message.lower():
            kind, words = ErrorCode.CONTEXT_EXCEEDED, ("This conversation no longer fits the model's context. Clear "
                                                       "the chat or undo a few turns to go on. The server said: ")
        elif code == "bad_image" or "image" in code:
            kind, words = ErrorCode.BAD_IMAGE, "The model server could not use an image in this message: "
        elif status == 401:
            kind, words = ErrorCode.ENGINE, "The model server refused the API key (check --backend-api-key): "
        elif 400 <= status < 500:
            kind, words = ErrorCode.INVALID_PARAMETER, "The model server refused this message: "
        else:
            kind, words = ErrorCode.ENGINE, "The model server failed while answering; you can retry. It said: "
        return Finished(self._stats(plan, 0, 0.0, 0.0, "error", kind.value), words + message)


def _sse_chunks(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if isinstance(chunk, dict):
            yield chunk


def _messages(system: str, items: list[Item], tokenizer) -> list[dict]:
    """OpenAI messages; each image as a data URI of the bytes the user sent (servers key caches by content), each
    document as text in front of the message's (`tokenizer` decodes a trimmed one's kept tokens)."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    for item in items:
        text = with_documents(item.documents, item.text, tokenizer)
        if item.role == "assistant" or not item.images:
            messages.append({"role": item.role, "content": text})
            continue
        parts = [{"type": "image_url", "image_url": {"url": _data_uri(im.picture.data)}} for im in item.images]
        messages.append({"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])})
    return messages


def _data_uri(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:  # the format, for the MIME type, from the header only
        mime = Image.MIME.get(im.format or "", "application/octet-stream")
    return f"data:{mime};base64,{b64encode(data).decode()}"


def _refuse(plan: Plan, error: str, code: ErrorCode) -> Plan:
    plan.error, plan.error_code = error, code.value
    return plan
