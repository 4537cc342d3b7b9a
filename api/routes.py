"""The OpenAI-compatible endpoints over one `ChatModel`: /v1/models, /v1/chat/completions, /v1/completions, /health.

`openai_router(...)` returns a FastAPI router that app.py includes next to the UI (so API and UI requests share the
engine and are batched together) and that `python -m api` serves alone. The API never changes what it was sent:
it plans in the chat layer's strict mode (`ChatModel.plan(..., fit=False)`), so a conversation that does not fit,
or an image that cannot be read, is a 400 with the numbers or the reason, not a silently trimmed chat.

Every handler runs under `_guarded`: any refusal is an `ApiError` in OpenAI's shape, anything unexpected a 500
(logged by exception type only: no user text, images or addresses in logs), and a client that disconnects before
its answer is complete has its requests aborted in the engine.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Awaitable, Callable, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, context_exceeded, from_finish, from_plan, invalid
from api.media import MediaError, MediaFetcher
from api.params import Params, check_logit_bias, parse
from api.responses import Shape, streamed, whole
from api.runs import Choice
from documents.intake import DocumentError
from engine.chat.chat_model import ChatModel
from engine.chat.messages import image_sources, is_data_uri, to_turns
from engine.chat.types import ChatImage, Plan
from engine.sampling_params import InvalidParameter
from vision.intake import ImageError

log = logging.getLogger("api")

MAX_BODY_BYTES = 128 * 2**20  # a few 20 MB images as base64, and the text
MAX_URL_IMAGES = 8  # image URLs fetched for one request (each up to the intake's byte cap)


class OpenAIEndpoints:
    def __init__(self, model: ChatModel, model_name: str, api_key: str | None = None, aliases: Sequence[str] = (),
                 fetcher: MediaFetcher | None = None, max_body_bytes: int = MAX_BODY_BYTES):
        self.model, self.model_name, self.api_key = model, model_name, api_key or None
        self.names = {model_name, *aliases}
        self.fetcher = fetcher or MediaFetcher(max_bytes=model.intake_limits.max_bytes)
        self.max_body_bytes = max_body_bytes

    # -- endpoints --------------------------------------------------------------------------------------------

    async def health(self) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            return exc.response()
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "visionchat",
                "max_model_len": self.model.context_len}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Response:
        return await self._guarded(request, self._chat)

    async def completions(self, request: Request) -> Response:
        return await self._guarded(request, self._complete)

    # -- the work ---------------------------------------------------------------------------------------------

    async def _chat(self, body: dict) -> Response:
        params = self._checked(parse(body, chat=True), "top_logprobs")
        messages = body.get("messages")
        try:
            sources = image_sources(messages)
            if sum(not is_data_uri(s) for s in sources) > MAX_URL_IMAGES:
                raise ApiError(400, f"At most {MAX_URL_IMAGES} image URLs are fetched per request; send the others "
                               "as data: URIs.", param="messages", code="too_many_image_urls")
            names = [f"image {i + 1}" for i in range(len(sources))]
            data = await asyncio.gather(*(self.fetcher.load(s, n) for s, n in zip(sources, names)))
            system, turns = to_turns(messages, lambda source, i: ChatImage(data[i], names[i]))
        except InvalidParameter as exc:
            raise invalid(exc) from None
        except MediaError as exc:
            raise ApiError(400, str(exc), param="messages", code=exc.code) from None
        except ImageError as exc:
            raise ApiError(400, str(exc), param="messages", code="bad_image") from None
        except DocumentError as exc:
            raise ApiError(400, str(exc), param="messages", code="bad_document") from None
        plan = await run_in_threadpool(self.model.plan, system, turns, params.max_tokens, None, False)
        if plan.error:
            raise from_plan(plan, params.max_tokens, "messages")
        return await self._run(self._shape(params, chat=True), [plan], params, "messages")

    async def _complete(self, body: dict) -> Response:
        params = self._checked(parse(body, chat=False), "logprobs")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt must be a string or a non-empty list of strings (token ids are not "
                           "accepted)", param="prompt", code="invalid_parameter")
        plans = [await run_in_threadpool(self._raw_plan, p, params.max_tokens) for p in prompts]
        return await self._run(self._shape(params, chat=False), plans, params, "prompt")

    def _shape(self, params: Params, chat: bool) -> Shape:
        return Shape(self.model_name, chat, self.model.token_pieces if params.logprobs is not None else None)

    def _checked(self, params: Params, logprobs_name: str) -> Params:
        """What only the model can check: a logit bias's token ids, and whether it gives log-probabilities."""
        check_logit_bias(params, self.model.vocab_size)
        if params.logprobs is not None and self.model.token_pieces is None:
            raise ApiError(400, "Log-probabilities are not available here: this server relays another one.",
                           param=logprobs_name, code="unsupported_parameter")
        return params

    def _raw_plan(self, text: str, max_tokens: int | None) -> Plan:
        """Raw mode (no chat template), checked like `plan(..., fit=False)`: the numbers, or a 400."""
        try:
            plan = self.model.plan_raw(text, [], max_tokens or 1)
        except ValueError as exc:  # e.g. the prompt writes the image token but no image comes with it
            raise ApiError(400, str(exc), param="prompt", code="invalid_parameter") from None
        room = plan.context_len - plan.prompt_tokens
        if plan.prompt_tokens < 1:
            raise ApiError(400, "prompt is empty", param="prompt", code="invalid_parameter")
        if room < (max_tokens or 1):
            raise context_exceeded(plan.prompt_tokens, max_tokens, plan.context_len, "prompt")
        plan.max_new_tokens = max_tokens or room
        return plan

    async def _run(self, shape: Shape, plans: list[Plan], params: Params, what: str) -> Response:
        """Start every choice of every prompt at once (they batch), then answer whole or streamed."""
        choices = [Choice(p * params.n + j, plan, self.model.astream(plan, settings))
                   for p, plan in enumerate(plans) for j, settings in enumerate(params.choices)]

        def error_of(choice: Choice) -> ApiError:
            stats = choice.error.stats
            return from_finish(stats.error_code, choice.error.message, choice.plan, params.max_tokens, what)

        if params.stream:
            return await streamed(shape, choices, error_of, params.include_usage)
        return await whole(shape, choices, error_of)

    # -- around every request ---------------------------------------------------------------------------------

    async def _guarded(self, request: Request, handler: Callable[[dict], Awaitable[Response]]) -> Response:
        try:
            self._authorize(request)
            body = await self._json(request)
            self._check_model(body)
            return await _until_disconnect(request, handler(body))
        except ApiError as exc:
            return exc.response()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- one request's failure is its own 500; the server goes on
            log.error("request failed: %s", type(exc).__name__)
            return ApiError(500, f"The server failed on this request ({type(exc).__name__}).", type="server_error",
                            code="internal_error").response()

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        length = request.headers.get("content-length", "")
        too_big = ApiError(413, f"The request body is larger than {self.max_body_bytes // 2**20} MB.",
                           code="request_too_large")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise too_big
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name not in self.names:
            raise ApiError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")


async def _until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """`work`, cancelled (its engine requests aborted) if the client goes away before it is done."""
    task = asyncio.ensure_future(work)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone.is_set():  # nobody will read this; the engine's requests were aborted by the cancellation
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()


def openai_router(model: ChatModel, model_name: str, api_key: str | None = None,
                  allowed_media_domains: Sequence[str] = (), aliases: Sequence[str] = (),
                  fetcher: MediaFetcher | None = None) -> APIRouter:
    """The /v1 routes (and /health) over `model`. Requests name the model `model_name` or one of `aliases`."""
    fetcher = fetcher or MediaFetcher(allowed_media_domains, max_bytes=model.intake_limits.max_bytes)
    endpoints = OpenAIEndpoints(model, model_name, api_key, aliases, fetcher)
    router = APIRouter()
    router.add_api_route("/health", endpoints.health, methods=["GET"], include_in_schema=False)
    router.add_api_route("/v1/models", endpoints.models, methods=["GET"])
    router.add_api_route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"])
    router.add_api_route("/v1/completions", endpoints.completions, methods=["POST"])
    return router
