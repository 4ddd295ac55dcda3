"""The providers against a local fake of the Anthropic and OpenAI APIs, through the real SDK and httpx2."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from chatd.assistant.anthropic_provider import AnthropicProvider
from chatd.assistant.providers import (
    ELIDED_TURN,
    OFFLINE_PREFIX,
    ChatMessage,
    Finished,
    GenerationRequest,
    OfflineProvider,
    OpenAIProvider,
    Provider,
    ProviderError,
    TextDelta,
    alternating_turns,
    make_provider,
)
from chatd.core.errors import ConfigError
from chatd.process.config import AssistantSettings
from tests.fake_anthropic import FakeLLM
from tests.support import free_port

MODEL = "claude-test"  # not in the SDK's list of deprecated models, which warns
KEY = "test-key"


@dataclass
class Outcome:
    deltas: list[str] = field(default_factory=list)
    finished: Finished | None = None
    error: ProviderError | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


async def collect(provider: Provider, request: GenerationRequest) -> Outcome:
    out = Outcome()
    try:
        async for event in provider.stream(request):
            assert out.finished is None, "nothing may follow Finished"
            if isinstance(event, TextDelta):
                out.deltas.append(event.text)
            else:
                out.finished = event
    except ProviderError as exc:
        out.error = exc
    return out


def request(*messages: ChatMessage, max_tokens: int = 100, temperature: float = 0.5) -> GenerationRequest:
    return GenerationRequest(
        MODEL, "be brief", messages or (ChatMessage("user", "hello there"),), max_tokens, temperature
    )


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeLLM) -> FakeLLM:
    fake_server.reset()
    return fake_server


def settings(**changes: Any) -> AssistantSettings:
    return AssistantSettings(provider_timeout_s=5, **changes)


@pytest.fixture
async def anthropic(fake: FakeLLM) -> AsyncIterator[Provider]:
    provider = make_provider(settings(provider="anthropic", anthropic_api_key=KEY, anthropic_base_url=fake.url))
    yield provider
    await provider.aclose()


@pytest.fixture
async def openai(fake: FakeLLM) -> AsyncIterator[Provider]:
    provider = make_provider(settings(provider="openai", openai_base_url=fake.openai_url, openai_api_key=KEY))
    yield provider
    await provider.aclose()


# ---------------------------------------------------------------------------------------------- anthropic


async def test_anthropic_streams_deltas_in_order_then_usage(anthropic: Provider, fake: FakeLLM) -> None:
    fake.script(reply="one two three four", tokens_per_s=500, require_api_key=KEY)
    out = await collect(anthropic, request(ChatMessage("user", "count to four please")))
    assert out.error is None
    assert anthropic.name == "anthropic"
    assert out.deltas == ["one ", "two ", "three ", "four"]
    # input: the words of the system prompt and the messages, as the fake counts them
    assert out.finished == Finished("end_turn", input_tokens=6, output_tokens=4)
    [sent] = fake.requests()
    assert sent["model"] == MODEL and sent["system"] == "be brief" and sent["stream"] is True
    assert sent["max_tokens"] == 100 and sent["temperature"] == 0.5
    assert sent["messages"] == [{"role": "user", "content": "count to four please"}]


async def test_anthropic_default_reply_quotes_the_last_user_message(anthropic: Provider, fake: FakeLLM) -> None:
    out = await collect(anthropic, request(ChatMessage("user", "ping 42")))
    assert out.text == "You said: ping 42"
    assert out.finished is not None and out.finished.output_tokens == 4


async def test_anthropic_max_tokens(anthropic: Provider, fake: FakeLLM) -> None:
    fake.script(reply="a b c d e f g h")
    out = await collect(anthropic, request(max_tokens=3))
    assert out.deltas == ["a ", "b ", "c "]
    assert out.finished is not None
    assert (out.finished.stop_reason, out.finished.output_tokens) == ("max_tokens", 3)


async def test_anthropic_overloaded_then_success(anthropic: Provider, fake: FakeLLM) -> None:
    fake.script(fail_status=529, fail_count=1)
    first = await collect(anthropic, request())
    assert first.error is not None and first.deltas == []
    assert (first.error.retryable, first.error.status) == (True, 529)
    assert "overloaded_error" in str(first.error)
    assert len(fake.requests()) == 1  # the provider does not retry by itself (the SDK's retries are off)

    second = await collect(anthropic, request())  # the orchestrator's retry
    assert second.error is None and second.text == "You said: hello there"
    assert len(fake.requests()) == 2


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(429, True), (500, True), (503, True), (529, True), (400, False), (401, False), (403, False), (404, False)],
)
async def test_anthropic_status_errors(anthropic: Provider, fake: FakeLLM, status: int, retryable: bool) -> None:
    fake.script(fail_status=status, fail_count=1)
    out = await collect(anthropic, request())
    assert out.error is not None and out.finished is None
    assert (out.error.status, out.error.retryable) == (status, retryable)


@pytest.mark.parametrize(
    ("error_type", "status", "retryable"),
    [("overloaded_error", 529, True), ("api_error", 500, True), ("invalid_request_error", 400, False)],
)
async def test_anthropic_error_event_mid_stream(
    anthropic: Provider, fake: FakeLLM, error_type: str, status: int, retryable: bool
) -> None:
    fake.script(reply="w1 w2 w3 w4 w5", error_after_tokens=2, error_type=error_type)
    out = await collect(anthropic, request())
    assert out.deltas == ["w1 ", "w2 "]  # yielded before the error
    assert out.finished is None and out.error is not None
    assert (out.error.status, out.error.retryable) == (status, retryable)
    assert error_type in str(out.error)


async def test_anthropic_connection_cut_mid_stream(anthropic: Provider, fake: FakeLLM) -> None:
    fake.script(reply="w1 w2 w3 w4 w5 w6", cut_after_tokens=3)
    out = await collect(anthropic, request())
    assert out.deltas == ["w1 ", "w2 ", "w3 "]
    assert out.finished is None and out.error is not None and out.error.retryable


async def test_anthropic_connection_reset_mid_stream(anthropic: Provider, fake: FakeLLM) -> None:
    fake.script(reply="w1 w2 w3 w4 w5 w6", cut_after_tokens=3, cut_mode="reset")
    out = await collect(anthropic, request())
    assert out.deltas == ["w1 ", "w2 ", "w3 "][: len(out.deltas)]  # an RST may drop data still in flight
    assert out.finished is None and out.error is not None and out.error.retryable


async def test_anthropic_timeout_before_first_byte(fake: FakeLLM) -> None:
    fake.script(first_byte_delay_s=1.5)
    # 0.5 s is below the setting's minimum of 1 s, which load() enforces: the dataclass alone does not.
    provider = AnthropicProvider(
        AssistantSettings(anthropic_api_key=KEY, anthropic_base_url=fake.url, provider_timeout_s=0.5)
    )
    try:
        out = await collect(provider, request())
    finally:
        await provider.aclose()
    assert out.error is not None and out.error.retryable and out.error.status is None
    assert "timed out" in str(out.error)


async def test_anthropic_connection_refused_is_retryable() -> None:
    provider = AnthropicProvider(settings(anthropic_api_key=KEY, anthropic_base_url=f"http://127.0.0.1:{free_port()}"))
    try:
        out = await collect(provider, request())
    finally:
        await provider.aclose()
    assert out.error is not None and out.error.retryable


async def test_anthropic_merges_turns_and_starts_with_user(anthropic: Provider, fake: FakeLLM) -> None:
    messages = (
        ChatMessage("assistant", "an answer whose question fell out of the context"),
        ChatMessage("user", "alice: hi"),
        ChatMessage("user", "bob: hello"),
        ChatMessage("assistant", "part one"),
        ChatMessage("assistant", "part two"),
        ChatMessage("user", "alice: thanks"),
        ChatMessage("user", "   "),
    )
    out = await collect(anthropic, request(*messages, temperature=1.5))
    assert out.error is None  # the fake answers 400 to turns that do not alternate
    [sent] = fake.requests()
    assert sent["messages"] == [
        {"role": "user", "content": ELIDED_TURN},
        {"role": "assistant", "content": "an answer whose question fell out of the context"},
        {"role": "user", "content": "alice: hi\n\nbob: hello"},
        {"role": "assistant", "content": "part one\n\npart two"},
        {"role": "user", "content": "alice: thanks"},
    ]
    assert sent["temperature"] == 1.0  # Anthropic's maximum; the setting allows OpenAI's 2


def test_alternating_turns_of_nothing_is_one_user_turn() -> None:
    assert alternating_turns(()) == [ChatMessage("user", ELIDED_TURN)]


# ---------------------------------------------------------------------------------------------- openai


async def test_openai_streams_deltas_and_usage(openai: Provider, fake: FakeLLM) -> None:
    fake.script(reply="one two three", require_api_key=KEY)
    messages = (
        ChatMessage("user", "a"),
        ChatMessage("user", "b"),
        ChatMessage("assistant", "c"),
        ChatMessage("user", "d"),
    )
    out = await collect(openai, request(*messages))
    assert out.error is None and openai.name == "openai"
    assert out.deltas == ["one ", "two ", "three"]
    # the fake counts the words of every message, the system one included
    assert out.finished == Finished("end_turn", input_tokens=2 + 4, output_tokens=3)
    [sent] = fake.requests()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == MODEL and sent["max_tokens"] == 100 and sent["temperature"] == 0.5
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]


async def test_openai_length_is_max_tokens(openai: Provider, fake: FakeLLM) -> None:
    fake.script(reply="a b c d e f")
    out = await collect(openai, request(max_tokens=2))
    assert out.deltas == ["a ", "b "]
    assert out.finished is not None
    assert (out.finished.stop_reason, out.finished.output_tokens) == ("max_tokens", 2)


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (400, False), (401, False)])
async def test_openai_status_errors(openai: Provider, fake: FakeLLM, status: int, retryable: bool) -> None:
    fake.script(fail_status=status, fail_count=1)
    out = await collect(openai, request())
    assert out.error is not None
    assert (out.error.status, out.error.retryable) == (status, retryable)


async def test_openai_wrong_key_is_not_retryable(openai: Provider, fake: FakeLLM) -> None:
    fake.script(require_api_key="another-key")
    out = await collect(openai, request())
    assert out.error is not None and (out.error.status, out.error.retryable) == (401, False)


async def test_openai_error_and_cut_mid_stream(openai: Provider, fake: FakeLLM) -> None:
    fake.script(reply="w1 w2 w3 w4", error_after_tokens=1)
    out = await collect(openai, request())
    assert out.deltas == ["w1 "] and out.error is not None and out.finished is None

    fake.script(reply="w1 w2 w3 w4", cut_after_tokens=2)
    out = await collect(openai, request())
    assert out.deltas == ["w1 ", "w2 "] and out.error is not None and out.error.retryable


# ---------------------------------------------------------------------------------------------- offline


class Sleeps:
    """An injected sleep and clock: records each pause, advances the clock by it and returns at once."""

    def __init__(self) -> None:
        self.delays_s: list[float] = []
        self.now = 0.0

    async def __call__(self, delay_s: float) -> None:
        self.delays_s.append(delay_s)
        self.now += delay_s

    def clock(self) -> float:
        return self.now


CONTEXT = (
    ChatMessage("user", "alice: what is the plan?"),
    ChatMessage("assistant", "earlier answer"),
    ChatMessage("user", "bob: summarise   the\n thread please"),
)


async def test_offline_is_named_and_deterministic() -> None:
    provider = OfflineProvider(50, sleep=(sleeps := Sleeps()), clock=sleeps.clock)
    first = await collect(provider, request(*CONTEXT))
    second = await collect(provider, request(*CONTEXT))
    assert provider.name == "offline"
    assert first.text == second.text and first.deltas == second.deltas
    assert first.text.startswith(OFFLINE_PREFIX)
    assert 'You said: "bob: summarise the thread please"' in first.text  # the last user message
    assert "(3 messages of context)" in first.text
    # Written for the people in the room: no setting or key of the server's operator (issue 22).
    assert not re.search(r"ANTHROPIC|API_KEY|base_url|assistant\.", first.text), first.text
    assert first.finished == second.finished
    assert first.finished is not None and first.finished.stop_reason == "end_turn"
    assert first.finished.input_tokens == len("be brief".split()) + sum(len(m.content.split()) for m in CONTEXT)
    other = await collect(provider, request(ChatMessage("user", "something else")))
    assert other.text != first.text


async def test_offline_streams_word_by_word_at_the_configured_rate() -> None:
    sleeps = Sleeps()
    provider = make_provider(settings(provider="offline", offline_tokens_per_s=20))
    assert isinstance(provider, OfflineProvider)
    provider = OfflineProvider(20, sleep=sleeps, clock=sleeps.clock)
    out = await collect(provider, request(*CONTEXT))
    assert out.finished is not None
    assert len(out.deltas) == out.finished.output_tokens == len(out.text.split())
    assert all(len(d.split()) == 1 for d in out.deltas)  # one word, with the whitespace after it
    assert sleeps.delays_s == [pytest.approx(1 / 20)] * len(out.deltas)  # one pause per token: 20 per second


async def test_offline_honours_max_tokens() -> None:
    sleeps = Sleeps()
    out = await collect(OfflineProvider(50, sleep=sleeps, clock=sleeps.clock), request(*CONTEXT, max_tokens=5))
    assert len(out.deltas) == 5 and len(sleeps.delays_s) == 5
    assert out.text.startswith(OFFLINE_PREFIX)
    assert out.finished is not None and (out.finished.stop_reason, out.finished.output_tokens) == ("max_tokens", 5)


async def test_offline_keeps_its_schedule_when_the_reader_is_late() -> None:
    sleeps = Sleeps()
    provider = OfflineProvider(10, sleep=sleeps, clock=sleeps.clock)
    deltas = []
    async for event in provider.stream(request(*CONTEXT, max_tokens=6)):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
            if len(deltas) == 2:
                sleeps.now += 0.35  # the reader was busy for 3.5 token intervals
    assert len(deltas) == 6
    # Tokens 3-5 were due meanwhile: they come at once (no pause); the 6th on the original schedule.
    assert sleeps.delays_s == [pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.05)]


async def test_offline_500_concurrent_streams_stay_cheap() -> None:
    provider = OfflineProvider(1000)
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(collect(provider, request(max_tokens=30)) for _ in range(500)))
    elapsed_s = time.perf_counter() - started
    assert all(o.finished is not None and len(o.deltas) == 30 for o in outcomes)
    # 30 ms of pacing each, concurrently: well under a second, plus the CPU of 15,000 events. Streams that
    # paced one after another would take 500 x 30 ms = 15 s; 10 s leaves a loaded CI machine its slack.
    assert elapsed_s < 10


# ---------------------------------------------------------------------------------------------- choice


async def test_make_provider_auto() -> None:
    cases = [
        (settings(anthropic_api_key=KEY, openai_base_url="http://127.0.0.1:1/v1"), AnthropicProvider),
        (settings(openai_base_url="http://127.0.0.1:1/v1"), OpenAIProvider),
        (settings(), OfflineProvider),
    ]
    for config, expected in cases:
        provider = make_provider(config)
        assert isinstance(provider, expected)
        await provider.aclose()


def test_make_provider_requires_what_the_choice_needs() -> None:
    with pytest.raises(ConfigError, match=r"assistant\.openai_base_url"):
        make_provider(settings(provider="openai"))
    with pytest.raises(ConfigError, match=r"assistant\.anthropic_api_key"):
        make_provider(settings(provider="anthropic"))
