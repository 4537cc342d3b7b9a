"""The chat-facing model: plan a reply within the context, then stream it. What app.py and the CLI talk to.

`plan()` never raises for user input: unreadable images become notices, a message that cannot fit becomes
`Plan.error`. `stream()` yields text deltas and then exactly one `Finished`, whose message explains any ending but a
normal stop; closing the stream aborts the request in the engine.
"""
from __future__ import annotations

from typing import Iterator

from engine.serving import EngineServer
from vision.intake import ImageError, IntakeLimits, image_digest, load_image
from vlm.budget import Item, fit
from vlm.loading import Bundle, load_bundle
from vlm.types import ChatTurn, Finished, GenerationSettings, Plan, TextDelta, TurnStats

REASONS = {
    "length": "The reply reached the max new tokens limit ({n}). Raise the limit in the settings, or ask the "
              "model to continue.",
    "context": "The conversation filled the model's context ({ctx} tokens). Clear the chat or undo a few turns "
               "to go on.",
    "abort": "Stopped.",
}


class ChatModel:
    def __init__(self, bundle: Bundle, intake_limits: IntakeLimits = IntakeLimits()):
        self.bundle = bundle
        self.name, self.description = bundle.name, bundle.description
        self.intake_limits = intake_limits
        self.server = EngineServer(bundle.engine)

    @classmethod
    def load(cls, model: str | None = None, device: str | None = None, **engine_kw) -> "ChatModel":
        return cls(load_bundle(model, device, **engine_kw))

    @property
    def context_len(self) -> int:
        return self.bundle.engine.context_len

    @property
    def sees_images(self) -> bool:
        return self.bundle.encoder is not None

    def _items(self, turns: list[ChatTurn], notices: list[str]) -> list[Item]:
        items = []
        for index, turn in enumerate(turns):
            newest = index == len(turns) - 1
            decoded = []
            for image in turn.images:
                if not self.sees_images:
                    if newest:
                        notices.append(f"{image.name} was not used: this model reads text only.")
                    continue
                try:
                    decoded.append((image.name, image_digest(image.data),
                                    load_image(image.data, image.name, self.intake_limits)))
                except ImageError as exc:
                    if newest:  # older ones were reported when they were sent
                        notices.append(f"{exc} It was left out.")
            items.append(Item(turn.role, turn.text, decoded))
        return items

    def plan(self, system: str, turns: list[ChatTurn], max_new_tokens: int) -> Plan:
        notices: list[str] = []
        plan = Plan(turns=list(turns), system=system, max_new_tokens=max_new_tokens, context_len=self.context_len,
                    notices=notices)
        if not turns or turns[-1].role != "user":
            plan.error = "There is no new message to answer."
            return plan
        items = self._items(turns, notices)
        if not items[-1].text.strip() and not items[-1].images:
            plan.error = notices.pop() if notices else "Please type a message or add an image."
            return plan
        encoder = self.bundle.encoder
        for item in items:
            if item.images:
                names, digests, pictures = zip(*item.images)
                feats = encoder.encode(list(pictures), list(digests))
                item.images = list(zip(names, digests, feats))
        fitted = fit(self.bundle.prompt, system, items, max_new_tokens, self.context_len)
        notices.extend(fitted.notices)
        if fitted.error:
            plan.error = fitted.error
            return plan
        feats = [f for it in fitted.items for _, _, f in it.images]
        digests = [d for it in fitted.items for _, d, _ in it.images]
        plan.prompt_tokens = len(fitted.prompt.ids)
        plan.image_tokens = sum(fitted.prompt.image_lengths)
        plan.max_new_tokens = fitted.max_new_tokens
        plan.prepared = (fitted.prompt.ids, fitted.prompt.spans(digests, feats))
        return plan

    def plan_raw(self, text: str, images: list, max_new_tokens: int) -> Plan:
        """Raw mode (no chat template): `text` marks each image's place with the image token."""
        if images and not self.sees_images:
            raise ValueError(f"{self.name} reads text only: it cannot take images")
        pictures = [load_image(im.data, im.name, self.intake_limits) for im in images]
        digests = [image_digest(im.data) for im in images]
        feats = self.bundle.encoder.encode(pictures, digests) if pictures else []
        prompt = self.bundle.prompt.encode(text, [f.shape[0] for f in feats])
        return Plan(turns=[], system="", prompt_tokens=len(prompt.ids), image_tokens=sum(prompt.image_lengths),
                    max_new_tokens=max_new_tokens, context_len=self.context_len,
                    prepared=(prompt.ids, prompt.spans(digests, feats)))

    def stream(self, plan: Plan, settings: GenerationSettings) -> Iterator[TextDelta | Finished]:
        if plan.error or plan.prepared is None:
            yield Finished(self._stats(plan, 0, 0.0, 0.0, "error"), plan.error or "Nothing to run.")
            return
        ids, spans = plan.prepared
        request = self.server.submit(ids, settings.sampling_params(plan.max_new_tokens), spans)
        text = []
        try:
            for delta in request:
                if delta.text:
                    text.append(delta.text)
                    yield TextDelta(delta.text)
            stats = request.stats
            reason = request.finish_reason.value
            turn = self._stats(plan, stats.generated_tokens, stats.ttft_s, stats.decode_tokens_per_s, reason)
            yield Finished(turn, self._message(turn, request.error, "".join(text)))
        finally:
            request.close()

    def _stats(self, plan: Plan, generated: int, ttft: float, tps: float, reason: str) -> TurnStats:
        return TurnStats(prompt_tokens=plan.prompt_tokens, image_tokens=plan.image_tokens,
                         generated_tokens=generated, ttft_s=ttft, decode_tokens_per_s=tps,
                         context_used=plan.prompt_tokens + generated, context_len=plan.context_len,
                         finish_reason=reason)

    @staticmethod
    def _message(stats: TurnStats, error: str | None, text: str) -> str | None:
        if stats.finish_reason == "error":
            return error or "The engine failed on this reply."
        if stats.finish_reason in REASONS:
            return REASONS[stats.finish_reason].format(n=stats.generated_tokens, ctx=stats.context_len)
        if not text.strip():
            return ("The model ended its reply at once, without any text. Try Retry (with a higher temperature), "
                    "or rephrase the question.")
        return None
