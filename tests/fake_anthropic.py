"""A local fake of the Anthropic Messages API, and of an OpenAI-compatible chat-completions endpoint.

A real HTTP server, so that chatd's providers run the real ``anthropic`` SDK (and ``httpx2``) over a real
socket: ``python -m tests.fake_anthropic --port N`` (0 picks a free port); it prints ``listening on PORT``
once it accepts connections.  ``FakeLLM`` runs it as a subprocess for tests.

- ``POST /v1/messages``: the Messages API, streamed with the event sequence of the real API (message_start,
  content_block_start, ping, one content_block_delta per token, content_block_stop, message_delta,
  message_stop) or answered whole.  Stricter than the real API on purpose: turns must alternate and start
  with a user turn (the real API silently combines consecutive turns), so a test sees what chatd sent.
- ``POST /v1/chat/completions``: the OpenAI chat-completions API, streamed as ``data:`` chunks until
  ``data: [DONE]``, with a usage chunk when ``stream_options.include_usage``.

A "token" is a word with the whitespace after it; usage counts those words.  Behaviour is scripted through
``POST /_control/script`` (a JSON object of ``Script`` fields, kept until replaced; failures count down),
``GET /_control/requests`` (every request body received, oldest first) and ``POST /_control/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import socket
import struct
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tornado.http1connection import HTTP1Connection
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

ROOT = Path(__file__).resolve().parent.parent
_TOKEN = re.compile(r"\S+\s*")

# error.type of the Anthropic error body for each HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


@dataclass
class Script:
    reply: str | None = None  # None: "You said: <last user message>"
    tokens_per_s: float = 0.0  # 0: as fast as the socket takes them
    fail_status: int = 0  # answer the next fail_count requests with this status and an error body
    fail_count: int = 0
    error_after_tokens: int | None = None  # then an SSE error event of error_type, and the end of the stream
    error_type: str = "overloaded_error"
    cut_after_tokens: int | None = None  # then drop the connection in the middle of the response body
    cut_mode: str = "close"  # "close": FIN, the client reads every byte sent; "reset": RST (data may be lost)
    first_byte_delay_s: float = 0.0  # before the status line
    require_api_key: str | None = None  # else 401: x-api-key or Bearer (the SDK since 2.0 sends Bearer)


@dataclass
class State:
    script: Script = field(default_factory=Script)
    requests: list[Any] = field(default_factory=list)


def tokens_of(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _text_of(content: Any) -> str:
    """The text of a message's content: a string or a list of content blocks."""
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if isinstance(b, dict))


def _bearer(authorization: str) -> str | None:
    scheme, _, key = authorization.partition(" ")
    return key if scheme == "Bearer" else None


def _count_words(*texts: str) -> int:
    return sum(len(t.split()) for t in texts)


class _Base(RequestHandler):
    def initialize(self, state: State) -> None:
        self.state = state

    def check_xsrf_cookie(self) -> None:  # an API, not a form
        pass

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def body_json(self) -> Any:
        return json.loads(self.request.body or b"null")

    async def play(self, script: Script, head: str, deltas: list[str], tail: str, error: str) -> None:
        """Stream head and the paced deltas, then tail, or the scripted error event or connection reset."""
        ending: str | None = tail
        if script.cut_after_tokens is not None:
            deltas, ending = deltas[: script.cut_after_tokens], None
        elif script.error_after_tokens is not None:
            deltas, ending = deltas[: script.error_after_tokens], error
        pause_s = 1 / script.tokens_per_s if script.tokens_per_s > 0 else 0.0
        try:
            self.write(head)
            await self.flush()
            for delta in deltas:
                if pause_s:
                    await asyncio.sleep(pause_s)
                self.write(delta)
                await self.flush()
        except StreamClosedError:
            return  # the client went away
        if ending is not None:
            self.finish(ending)
            return
        # Drop the connection mid-body, as a crashed server or proxy would.
        connection = self.request.connection
        assert isinstance(connection, HTTP1Connection)
        stream = connection.stream
        if script.cut_mode == "reset":
            # An RST makes the client's kernel discard unread data: give the client time to read first.
            await asyncio.sleep(0.2)
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.close()

    async def prologue(self) -> tuple[Script, Any] | None:
        """Record the request and apply the script's delay and failures; None when already answered."""
        body = self.body_json()
        self.state.requests.append(body)
        script = self.state.script
        if script.first_byte_delay_s:
            await asyncio.sleep(script.first_byte_delay_s)
        if script.require_api_key is not None and self.api_key() != script.require_api_key:
            self.fail(401, "invalid x-api-key")
            return None
        if script.fail_count > 0:
            script.fail_count -= 1
            self.fail(script.fail_status, f"scripted {script.fail_status}")
            return None
        return script, body

    def api_key(self) -> str | None:
        raise NotImplementedError

    def fail(self, status: int, message: str) -> None:
        raise NotImplementedError


class MessagesHandler(_Base):
    def api_key(self) -> str | None:
        return self.request.headers.get("x-api-key") or _bearer(self.request.headers.get("Authorization", ""))

    def fail(self, status: int, message: str) -> None:
        kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.set_header("request-id", "req_fake")
        self.write_json(status, {"type": "error", "error": {"type": kind, "message": message}})

    def invalid(self, body: Any) -> str | None:
        """The 400 message of the real API for what chatd could get wrong, or None."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "messages: at least one message is required"
        for i, message in enumerate(messages):
            if message.get("role") != ("user" if i % 2 == 0 else "assistant"):
                return f"messages.{i}: roles must alternate between user and assistant, starting with user"
            if not _text_of(message.get("content", "")).strip():
                return f"messages.{i}: text content blocks must contain non-whitespace text"
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, int | float) or not 0 <= temperature <= 1:
            return "temperature: Input should be less than or equal to 1"
        return None

    async def post(self) -> None:
        started = await self.prologue()
        if started is None:
            return
        script, body = started
        problem = self.invalid(body)
        if problem:
            self.fail(400, problem)
            return
        messages = body["messages"]
        last_user = next((_text_of(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
        tokens = tokens_of(script.reply if script.reply is not None else f"You said: {last_user}")
        stop_reason = "end_turn"
        if len(tokens) > body["max_tokens"]:
            tokens, stop_reason = tokens[: body["max_tokens"]], "max_tokens"
        system = body.get("system", "")
        input_tokens = _count_words(_text_of(system), *(_text_of(m["content"]) for m in messages))
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        self.set_header("request-id", "req_fake")
        if not body.get("stream"):
            message["content"] = [{"type": "text", "text": "".join(tokens)}]
            message["stop_reason"] = stop_reason
            message["usage"]["output_tokens"] = len(tokens)
            self.write_json(200, message)
            return

        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")

        def event(name: str, data: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        head = [
            event("message_start", {"type": "message_start", "message": message}),
            event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            event("ping", {"type": "ping"}),
        ]
        deltas = [
            event(
                "content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}},
            )
            for token in tokens
        ]
        tail = [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": len(tokens)},
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]
        error = {"type": "error", "error": {"type": script.error_type, "message": f"scripted {script.error_type}"}}
        await self.play(script, "".join(head), deltas, "".join(tail), event("error", error))


class ChatCompletionsHandler(_Base):
    def api_key(self) -> str | None:
        return _bearer(self.request.headers.get("Authorization", ""))

    def fail(self, status: int, message: str) -> None:
        kind = "rate_limit_exceeded" if status == 429 else "server_error" if status >= 500 else "invalid_request"
        self.write_json(status, {"error": {"message": message, "type": kind, "code": status}})

    async def post(self) -> None:
        started = await self.prologue()
        if started is None:
            return
        script, body = started
        messages = body.get("messages") or []
        if not isinstance(body.get("model"), str) or not messages:
            self.fail(400, "model and messages are required")
            return
        last_user = next((_text_of(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")
        tokens = tokens_of(script.reply if script.reply is not None else f"You said: {last_user}")
        finish_reason = "stop"
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        if max_tokens and len(tokens) > max_tokens:
            tokens, finish_reason = tokens[:max_tokens], "length"
        prompt_tokens = _count_words(*(_text_of(m["content"]) for m in messages))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}
        usage["total_tokens"] = prompt_tokens + len(tokens)
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(tokens)}
            choice = {"index": 0, "message": message, "finish_reason": finish_reason}
            self.write_json(200, {**base, "object": "chat.completion", "choices": [choice], "usage": usage})
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        head = chunk({"role": "assistant", "content": ""})
        deltas = [chunk({"content": token}) for token in tokens]
        tail = [chunk({}, finish_reason)]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n")
        tail.append("data: [DONE]\n\n")
        error = {"error": {"message": f"scripted {script.error_type}", "type": script.error_type}}
        await self.play(script, head, deltas, "".join(tail), f"data: {json.dumps(error)}\n\n")


class ScriptHandler(_Base):
    def post(self) -> None:
        try:
            self.state.script = Script(**self.body_json())
        except TypeError as exc:
            self.write_json(400, {"error": str(exc)})
            return
        self.write_json(200, dataclasses.asdict(self.state.script))


class RequestsHandler(_Base):
    def get(self) -> None:
        self.write_json(200, self.state.requests)


class ResetHandler(_Base):
    def post(self) -> None:
        self.state.script, self.state.requests = Script(), []
        self.write_json(200, {})


def make_app(state: State | None = None) -> Application:
    args = {"state": state or State()}
    return Application(
        log_function=lambda handler: None,  # scripted 5xx are not news
        handlers=[
            (r"/v1/messages", MessagesHandler, args),
            (r"/v1/chat/completions", ChatCompletionsHandler, args),
            (r"/_control/script", ScriptHandler, args),
            (r"/_control/requests", RequestsHandler, args),
            (r"/_control/reset", ResetHandler, args),
        ],
    )


async def serve(port: int) -> None:
    sockets = bind_sockets(port, "127.0.0.1")
    HTTPServer(make_app()).add_sockets(sockets)
    print(f"listening on {sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


class FakeLLM:
    """The fake server as a subprocess on a free port, with the control endpoints as methods."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_anthropic", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the server prints its port once it listens
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"fake LLM server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[-1])}"
        self.requests()  # and it answers

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def script(self, **fields: Any) -> None:
        self._call("POST", "/_control/script", fields)

    def requests(self) -> list[Any]:
        result: list[Any] = self._call("GET", "/_control/requests")
        return result

    def reset(self) -> None:
        self._call("POST", "/_control/reset", {})

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> FakeLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1; 0 picks a free one")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
