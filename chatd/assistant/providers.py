"""LLM providers: one streaming interface over Anthropic, OpenAI-compatible servers and an offline stand-in.

``Provider.stream`` yields ``TextDelta`` events then exactly one ``Finished``, and turns every failure, also
one in the middle of the stream, into ``ProviderError`` whose ``retryable`` tells the orchestrator whether a
new attempt may succeed.  Providers never retry by themselves: only the orchestrator knows whether a token
has already reached the room (a retry then would repeat it).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx2

from chatd.core.errors import ConfigError
from chatd.process.config import AssistantSettings
from chatd.process.logs import assistant_log, fields


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    model: str
    system: str
    messages: tuple[ChatMessage, ...]  # any order of roles: providers normalise (see ``alternating_turns``)
    max_tokens: int
    temperature: float


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    stop_reason: Literal["end_turn", "max_tokens"]
    input_tokens: int
    output_tokens: int


StreamEvent = TextDelta | Finished


class ProviderError(Exception):
    """A failed generation.

    retryable: timeouts, 408/409/429, 5xx, 529 overloaded, connection reset or stream cut short;
    not retryable: 400/401/403/404 and other client errors, malformed responses.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status


class Provider(Protocol):
    name: str  # "anthropic" | "openai" | "offline"

    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


# The first turn must be a user turn (Anthropic, and the chat templates of many local models); a context
# window that starts in the middle of a conversation gets this stand-in for the cut-off part.
ELIDED_TURN = "(earlier messages omitted)"


def alternating_turns(messages: Iterable[ChatMessage]) -> list[ChatMessage]:
    """Strictly alternating turns starting with a user turn.

    Consecutive messages of one role (several people talking in a group chat) are joined with a blank line;
    blank messages are dropped, as Anthropic rejects whitespace-only text.
    """
    turns: list[ChatMessage] = []
    for message in messages:
        if not message.content.strip():
            continue
        if turns and turns[-1].role == message.role:
            turns[-1] = ChatMessage(message.role, f"{turns[-1].content}\n\n{message.content}")
        else:
            turns.append(message)
    if not turns or turns[0].role != "user":
        turns.insert(0, ChatMessage("user", ELIDED_TURN))
    return turns


def is_retryable_status(status: int) -> bool:
    # The statuses the official SDKs retry: 409 is Anthropic's lock timeout, 529 is "overloaded".
    return status in (408, 409, 429) or status >= 500


def transport_error(provider: str, exc: httpx2.HTTPError) -> ProviderError:
    """Network trouble: a new attempt on a new connection may succeed; a bad URL or protocol will not."""
    retryable = isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError)
    detail = f": {exc}" if str(exc) else ""
    return ProviderError(f"{provider}: {type(exc).__name__}{detail}", retryable=retryable)


def log_failure(provider: str, error: ProviderError) -> ProviderError:
    # Debug only: the orchestrator logs each retry and the final failure with this message.
    assistant_log.debug(
        "provider_error",
        extra=fields(provider=provider, status=error.status, retryable=error.retryable, error=error.message),
    )
    return error


# ---------------------------------------------------------------------------------------------- openai


def word_count(text: str) -> int:
    """Whitespace-separated words: the offline provider's token, and the fallback of servers without usage."""
    return len(text.split())


class OpenAIProvider:
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, Ollama, vLLM, llama.cpp), streamed."""

    name = "openai"

    def __init__(self, settings: AssistantSettings) -> None:
        headers = {"Authorization": f"Bearer {settings.openai_api_key}"} if settings.openai_api_key else {}
        self._client = httpx2.AsyncClient(
            # The trailing slash makes the relative path below extend the base path (".../v1/chat/completions").
            base_url=settings.openai_base_url.rstrip("/") + "/",
            headers=headers,
            timeout=settings.provider_timeout_s,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        turns = alternating_turns(request.messages)
        body = {
            "model": request.model,
            "messages": [{"role": "system", "content": request.system}]
            + [{"role": t.role, "content": t.content} for t in turns],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        output: list[str] = []
        try:
            async with self._client.stream("POST", "chat/completions", json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _openai_status_error(response.status_code, response.text)
                async for sse in httpx2.EventSource(response):
                    if sse.data == "[DONE]":
                        break
                    chunk = sse.json()
                    if not isinstance(chunk, dict):
                        raise ValueError(f"expected an object, got {sse.data[:100]!r}")
                    if "error" in chunk:  # vLLM and others report a failure inside a 200 stream
                        raise _openai_status_error(500, sse.data)
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            output.append(text)
                            yield TextDelta(text)
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = chunk.get("usage") or usage
        except ProviderError as exc:
            raise log_failure(self.name, exc) from None
        except httpx2.SSEError as exc:  # not an event stream at all
            error = ProviderError(f"openai: {exc}", retryable=False)
            raise log_failure(self.name, error) from exc
        except httpx2.HTTPError as exc:
            raise log_failure(self.name, transport_error(self.name, exc)) from exc
        except (ValueError, AttributeError, TypeError) as exc:  # JSON that is not a chat.completion.chunk
            error = ProviderError(f"openai: malformed response: {exc}", retryable=False)
            raise log_failure(self.name, error) from exc
        if finish_reason is None:
            error = ProviderError("openai: stream ended without a finish_reason", retryable=True)
            raise log_failure(self.name, error)
        if usage is None:  # servers that ignore stream_options
            prompt = " ".join([request.system, *(t.content for t in turns)])
            usage = {"prompt_tokens": word_count(prompt), "completion_tokens": word_count("".join(output))}
        yield Finished(
            stop_reason="max_tokens" if finish_reason == "length" else "end_turn",
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _openai_status_error(status: int, body: str) -> ProviderError:
    return ProviderError(f"openai: {status}: {body[:500]}", retryable=is_retryable_status(status), status=status)


# ---------------------------------------------------------------------------------------------- offline

OFFLINE_PREFIX = "[offline assistant] "
_OFFLINE_SUMMARY_WORDS = 30
_TOKEN = re.compile(r"\S+\s*")  # a word and the whitespace after it: the tokens join back into the text


class OfflineProvider:
    """A stand-in for machines without a model: echoes the last user message, streamed at a steady rate.

    Deterministic (the reply depends only on the request) and cheap (at most one sleep per token), so that
    tests and load tests exercise the whole streaming path without a network.  Tokens come on a fixed
    schedule, as from a remote model: a busy event loop that wakes late gets the tokens that are due at
    once (as from a socket's buffer), not a provider that slows down with it.
    """

    name = "offline"

    def __init__(
        self,
        tokens_per_s: float,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token_interval_s = 1.0 / tokens_per_s
        self._sleep = sleep  # injectable with the clock: tests count the pauses instead of timing them
        self._clock = clock

    @staticmethod
    def reply(request: GenerationRequest) -> str:
        last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        words = last_user.split()
        summary = " ".join(words[:_OFFLINE_SUMMARY_WORDS]) + (" ..." if len(words) > _OFFLINE_SUMMARY_WORDS else "")
        # Words for the people in the room, not for whoever runs the server (OPERATIONS.md says how to connect a model).
        return (
            f'{OFFLINE_PREFIX}You said: "{summary}" ({len(request.messages)} messages of context). '
            "I am a stand-in that can only repeat what you write; "
            "real answers come once this server is connected to a language model."
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        tokens = _TOKEN.findall(self.reply(request))
        sent = tokens[: request.max_tokens]
        due = self._clock()
        for token in sent:
            due += self._token_interval_s
            delay_s = due - self._clock()
            if delay_s > 0:
                await self._sleep(delay_s)
            yield TextDelta(token)
        prompt = " ".join([request.system, *(m.content for m in request.messages)])
        yield Finished(
            stop_reason="max_tokens" if len(sent) < len(tokens) else "end_turn",
            input_tokens=word_count(prompt),
            output_tokens=len(sent),
        )

    async def aclose(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- choice


def make_provider(settings: AssistantSettings) -> Provider:
    """The configured provider; ``auto``: Anthropic with a key, else an OpenAI-compatible URL, else offline."""
    choice = settings.provider
    if choice == "auto":
        choice = "anthropic" if settings.anthropic_api_key else "openai" if settings.openai_base_url else "offline"
    provider: Provider
    if choice == "anthropic":
        if not settings.anthropic_api_key:
            raise ConfigError("assistant.anthropic_api_key", "required with assistant.provider = anthropic")
        from chatd.assistant.anthropic_provider import AnthropicProvider  # the SDK costs ~2 s of imports

        provider = AnthropicProvider(settings)
        base_url = settings.anthropic_base_url or "default"
    elif choice == "openai":
        if not settings.openai_base_url:
            raise ConfigError("assistant.openai_base_url", "required with assistant.provider = openai")
        provider = OpenAIProvider(settings)
        base_url = settings.openai_base_url
    else:
        provider = OfflineProvider(settings.offline_tokens_per_s)
        base_url = ""
    assistant_log.info(
        "assistant_provider", extra=fields(provider=provider.name, model=settings.model, base_url=base_url)
    )
    return provider
