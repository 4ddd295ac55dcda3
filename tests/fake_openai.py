"""A local fake OpenAI-compatible server (``POST /v1/chat/completions``, streamed as SSE ``data:`` chunks
until ``data: [DONE]``), for tests of room assistants whose provider is ``openai``.

The endpoint is the one ``tests.fake_anthropic`` already serves (one implementation of the wire format);
this is its own process with its own script, so that a test can make the OpenAI-compatible server fail
(``script(fail_status=500, fail_count=...)``) while a fake Anthropic API, or the offline provider, keeps
answering in the same room.  ``base_url`` is what ``assistant.openai_base_url`` takes.
"""

from __future__ import annotations

from typing import Any

from tests.fake_anthropic import FakeLLM


class FakeOpenAI(FakeLLM):
    """The fake as a subprocess on a free port; ``script``, ``requests`` and ``reset`` as in ``FakeLLM``."""

    @property
    def base_url(self) -> str:
        return self.openai_url

    def completions(self) -> list[dict[str, Any]]:
        """The chat-completions request bodies received, oldest first."""
        return [r for r in self.requests() if isinstance(r, dict) and r.get("stream") is not None and "messages" in r]
