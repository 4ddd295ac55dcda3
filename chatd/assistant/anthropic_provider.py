"""The Anthropic Messages API through the official SDK, streamed.

A module of its own so that only a server configured for Anthropic imports the SDK: importing it costs
about 2 s of CPU and tens of MB in every worker (docs/BENCHMARKS.md, "worker start").
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import httpx2
from anthropic.types import AssistantMessageParam, Message, MessageParam, UserMessageParam

from chatd.assistant.providers import (
    Finished,
    GenerationRequest,
    ProviderError,
    StreamEvent,
    TextDelta,
    alternating_turns,
    is_retryable_status,
    log_failure,
    transport_error,
)
from chatd.process.config import AssistantSettings

# HTTP status equivalent of the ``error.type`` of an SSE ``error`` event (sent with status 200 mid-stream).
_ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_ANTHROPIC_MAX_TEMPERATURE = 1.0  # the setting allows OpenAI's 0..2; Anthropic answers 400 above 1


class AnthropicProvider:
    """The Messages API through the official SDK, streamed."""

    name = "anthropic"

    def __init__(self, settings: AssistantSettings) -> None:
        self._client = anthropic.AsyncAnthropic(
            api_key=settings.anthropic_api_key or None,
            base_url=settings.anthropic_base_url or None,
            max_retries=0,  # the orchestrator retries, and only before the first token
            timeout=settings.provider_timeout_s,  # connect, and between two reads of the stream
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        messages: list[MessageParam] = [
            UserMessageParam(role="user", content=t.content)
            if t.role == "user"
            else AssistantMessageParam(role="assistant", content=t.content)
            for t in alternating_turns(request.messages)
        ]
        final: Message | None = None
        try:
            async with self._client.messages.stream(
                model=request.model,
                system=request.system,
                messages=messages,
                max_tokens=request.max_tokens,
                # SDK 1.0 dropped the sampling parameters from the signature; the API still takes them.
                # 1.0 is the API's default; newer models refuse an explicit temperature, so send none then.
                extra_body=(
                    {}
                    if request.temperature == 1.0
                    else {"temperature": min(request.temperature, _ANTHROPIC_MAX_TEMPERATURE)}
                ),
            ) as events:
                async for event in events:
                    if event.type == "text":
                        yield TextDelta(event.text)
                    elif event.type == "message_stop":
                        final = event.message  # the accumulated message, with the usage of message_delta
        except anthropic.APIStatusError as exc:
            raise log_failure(self.name, _anthropic_status_error(exc)) from exc
        except anthropic.APIConnectionError as exc:  # raised before the response; the cause is the httpx2 error
            kind = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "connection failed"
            error = ProviderError(f"anthropic: {kind}: {exc.__cause__ or exc.message}", retryable=True)
            raise log_failure(self.name, error) from exc
        except httpx2.HTTPError as exc:  # the SDK does not wrap errors while reading the stream
            raise log_failure(self.name, transport_error(self.name, exc)) from exc
        except (anthropic.AnthropicError, ValueError) as exc:  # schema or JSON errors: a broken server
            error = ProviderError(f"anthropic: malformed response: {exc}", retryable=False)
            raise log_failure(self.name, error) from exc
        if final is None:
            error = ProviderError("anthropic: stream ended before message_stop", retryable=True)
            raise log_failure(self.name, error)
        yield Finished(
            stop_reason="max_tokens" if final.stop_reason == "max_tokens" else "end_turn",
            input_tokens=final.usage.input_tokens,
            output_tokens=final.usage.output_tokens,
        )

    async def aclose(self) -> None:
        await self._client.close()


def _anthropic_status_error(exc: anthropic.APIStatusError) -> ProviderError:
    kind = exc.type or "error"
    status = exc.status_code
    if status < 400:  # an SSE error event inside a 200 stream
        status = _ANTHROPIC_ERROR_STATUS.get(kind, 500)
    return ProviderError(
        f"anthropic: {status} {kind}: {exc.api_message or exc.message}",
        retryable=is_retryable_status(status),
        status=status,
    )
