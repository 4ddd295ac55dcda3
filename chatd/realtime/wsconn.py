"""RFC 6455 as chatd speaks it: wsproto's sans-I/O codec driven on a detached Tornado stream.

Tornado's handshake machinery is public API, what it runs after the handshake
is not.  So ``WebSocket`` (``chatd.realtime.wshandler``) is a plain ``RequestHandler``: ``get`` checks the
upgrade request, answers ``101`` through ``finish()`` (access log as for any
request), takes the stream with the public ``detach()``, and from then on reads
``stream.read_bytes(n, partial=True)`` into wsproto's ``Connection`` (RFC 6455
frames, masking, fail-fast UTF-8, close codes, minimal length encodings,
permessage-deflate inbound) and writes what it answers.  No private Tornado,
IOStream or wsproto name is used.

What chatd adds around the codec:

* ``_Frames``, a frame-boundary scanner over the same bytes (headers only, a few
  operations per frame): a data frame announcing more than ``max_message_size``
  (with the message's earlier fragments) is answered ``1009`` at its header,
  and its payload is read and discarded, not buffered; after chatd sent a close
  frame, it finds the client's close frame in what is discarded;
* every protocol violation (wsproto's ``ParseFailed``: unmasked frame, reserved
  bits, unknown opcode, fragmented or oversized control frame, non-minimal
  length, invalid close code, invalid UTF-8 incl. after inflating) is answered
  with its close code (1002, 1007), logged ``ws_protocol_error``; a close code
  a client may not send is never echoed;
* after chatd sent a close frame, whatever the client still sends is read and
  discarded until its close frame arrives, for at most ``close_timeout_s``; then
  the TCP connection is dropped.  Data frames are no longer delivered;
* writes: a frame is ``send()`` to the socket at once when nothing is queued
  (fan-out writes the same pre-framed bytes to every socket), else queued here
  and handed to ``stream.write`` in whole frames, at most ``_WRITE_CHUNK`` at a
  time; past ``max_buffer`` queued bytes ``write_frame`` raises ``BufferFull``
  and ``drop_unsent()`` drops the queued frames, so the close frame that follows
  is next on the wire (a chunk already handed to the stream ends on a frame
  boundary);
* permessage-deflate: negotiated with wsproto's ``PerMessageDeflate``, which
  inflates (read in ``_READ_CHUNK_DEFLATE`` pieces: bounded output per step);
  outbound messages are compressed here, at the configured level and memLevel;
* a ping every ``websocket_ping_interval``; no pong within
  ``websocket_ping_timeout`` (at most the interval) closes "ping timed out".

Every close chatd sends is reported once to ``count_close_sent``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import struct
import zlib
from typing import TYPE_CHECKING, Any

from tornado.iostream import IOStream, StreamClosedError
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import PerMessageDeflate

from chatd.core import wsframe
from chatd.core.errors import CloseCode
from chatd.process.logs import app_log, fields

if TYPE_CHECKING:
    from chatd.realtime.wshandler import WebSocket

_READ_CHUNK = 65_536
_READ_CHUNK_DEFLATE = 4_096  # inflated output per step stays ~4 MB at worst (zlib's ratio is ~1000:1)
_WRITE_CHUNK = 65_536  # queued frames handed to the stream at most this much at a time (whole frames)
_PING = b"\x89\x00"  # a server ping, empty (never masked, never compressed)
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4.1/7.4.2, the IANA registry): never 1004-1006, 1015, or < 1000."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def accept_value(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()).decode()


class BufferFull(Exception):
    """``write_frame`` past ``max_buffer`` queued bytes: the client does not read."""


class _Frames:
    """Frame boundaries of the client's byte stream, from the headers alone (payloads are skipped).

    ``scan`` (open): where the first data frame over the size limit starts, if any; ``skip`` (closing):
    whether the client's close frame ended in the bytes given.  Both keep the position across calls.
    """

    __slots__ = ("closes", "head", "left", "max_message", "message", "opcode")

    def __init__(self, max_message: int) -> None:
        self.head = b""  # a header split across reads
        self.left = 0  # payload bytes of the current frame still to come
        self.opcode = 0
        self.message = 0  # announced bytes of the data message being received
        self.max_message = max_message
        self.closes = 0  # close frames that ended in the bytes scanned by the last call

    def _header(self, data: bytes, pos: int) -> tuple[int, int, int, int] | None:
        """(opcode, fin, payload length, header bytes taken from data) or None (incomplete: kept)."""
        buf = self.head + data[pos : pos + 14] if self.head else data[pos : pos + 14]
        if len(buf) < 2:
            self.head = buf
            return None
        size = 2 + (4 if buf[1] & 0x80 else 0)
        length = buf[1] & 0x7F
        if length == 126:
            size += 2
        elif length == 127:
            size += 8
        if len(buf) < size:
            self.head = buf
            return None
        if length == 126:
            length = struct.unpack_from("!H", buf, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", buf, 2)[0]
        taken = size - len(self.head)
        return buf[0] & 0x0F, buf[0] & 0x80, length, taken

    def scan(self, data: bytes) -> int | None:
        """Open: the offset in ``data`` of the first oversize data frame (its header not consumed), else None."""
        pos, end = 0, len(data)
        self.closes = 0
        while pos < end:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
                if not self.left and self.opcode == 0x8:
                    self.closes += 1
                continue
            start = pos
            parsed = self._header(data, pos)
            if parsed is None:
                return None
            opcode, fin, length, taken = parsed
            if opcode < 0x8:
                total = length if opcode else self.message + length
                if total > self.max_message:
                    return start  # self.head still holds this header's earlier bytes, if any
                self.message = 0 if fin else total
            self.head = b""
            pos += taken
            self.opcode, self.left = opcode, length
            if not length and opcode == 0x8:
                self.closes += 1
        return None

    def skip(self, data: bytes) -> bool:
        """Closing: discard ``data``; True once a close frame (of at most 125 bytes) has ended in it."""
        pos, end = 0, len(data)
        while pos < end:
            if self.left:
                step = min(self.left, end - pos)
                self.left -= step
                pos += step
                if not self.left and self.opcode == 0x8:
                    return True
                continue
            parsed = self._header(data, pos)
            if parsed is None:
                return False
            opcode, _fin, length, taken = parsed
            self.head = b""
            pos += taken
            self.opcode, self.left = (opcode if length <= 125 else 0), length
            if not length and opcode == 0x8:
                return True
        return False


class WsConnection:
    """One server-side WebSocket on a detached stream: wsproto for the frames, chatd's writes and closes."""

    def __init__(
        self,
        handler: WebSocket,
        stream: IOStream,
        deflate: PerMessageDeflate | None,
        compression: dict[str, Any] | None,
        max_message_size: int,
        close_timeout_s: float,
    ) -> None:
        self.handler = handler
        self.stream = stream
        self.proto = Connection(ConnectionType.SERVER, [deflate] if deflate is not None else None)
        self.deflate = deflate
        self._compression = compression or {}
        self._compressor: Any = None  # zlib compressobj of outbound messages (deflate only)
        self.max_message_size = max_message_size
        self.close_timeout_s = close_timeout_s
        self.max_buffer: int | None = None
        self.server_terminated = False
        self.client_terminated = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._frames = _Frames(max_message_size)
        self._parts: list[Any] = []  # the fragments of the message being received
        self._size = 0
        self._out: collections.deque[bytes] = collections.deque()
        self._out_bytes = 0
        self._inflight = 0  # bytes handed to stream.write, not yet written
        self._close_when_flushed = False
        self._closer: asyncio.TimerHandle | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._pong = False
        self._ping_at = 0.0
        self._loop = asyncio.get_running_loop()
        if deflate is None:
            self.write_frame = self._write  # type: ignore[method-assign,assignment]  # fan-out hot path: one call

    # -- reading --------------------------------------------------------------------

    async def run(self) -> None:
        """The read loop: until the stream closes.  One message at a time: the next is read once
        ``on_message`` (and what it returned) is done, which is how backpressure works."""
        chunk = _READ_CHUNK if self.deflate is None else _READ_CHUNK_DEFLATE
        stream = self.stream
        try:
            while True:
                data = await stream.read_bytes(chunk, partial=True)
                if self.server_terminated:
                    if self._frames.skip(data):
                        self._client_closed(None, None)
                    continue
                cut = self._frames.scan(data)
                if cut is None:
                    await self._receive(data, self._frames.closes)
                    continue
                if cut:
                    await self._receive(data[:cut], self._frames.closes)
                if not self.server_terminated:
                    self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
                if self._frames.skip(data[cut:]):
                    self._client_closed(None, None)
        except StreamClosedError:
            pass
        except Exception as exc:  # a bug here must not leave the socket open and unread
            app_log.error("ws_read_failed", exc_info=exc, extra=fields(connection_id=self._id()))
            self.abort()
        finally:
            self._stream_closed()

    async def _receive(self, data: bytes, closes: int) -> None:
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self.server_terminated:
                    continue  # chatd already said goodbye: not delivered
                message = self._assemble(event)
                if message is not None:
                    handled = self.handler.on_message(message)
                    if handled is not None:
                        await handled
            elif isinstance(event, Ping):
                if not self.server_terminated:
                    try:
                        self._write(proto.send(event.response()))
                    except BufferFull:  # pings from a client that does not read
                        self.drop_unsent()
                        self.max_buffer = None
                        self.close(int(CloseCode.TRY_AGAIN_LATER), "too slow: send buffer full")
            elif isinstance(event, Pong):
                self._pong = True
            elif isinstance(event, CloseConnection):
                state = proto.state
                if state is ConnectionState.REMOTE_CLOSING or state is ConnectionState.CLOSED:
                    self._client_closed(event.code, event.reason)
                elif state is ConnectionState.OPEN:  # wsproto could not parse what the client sent
                    code, detail = int(event.code), event.reason or "protocol error"
                    self.fail(code, "invalid UTF-8" if code == CloseCode.INVALID_PAYLOAD else detail[:100], detail)
                    if closes:  # a close frame is among these bytes: the client is done (or sent a bad one)
                        self._client_closed(None, None)
                return

    def _assemble(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        data = event.data if isinstance(event, TextMessage) else bytes(event.data)
        if event.message_finished and not self._parts:
            if self.deflate is not None and len(data) > self.max_message_size:
                self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big after decompression")
                return None
            return data
        self._parts.append(data)
        self._size += len(data)
        if self._size > self.max_message_size:  # only inflated messages get here (_Frames checks the others)
            self._parts, self._size = [], 0
            self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big after decompression")
            return None
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        return "".join(parts) if isinstance(data, str) else b"".join(parts)

    def _client_closed(self, code: int | None, reason: str | None) -> None:
        """The client's close frame arrived: answer it (unless chatd closed first), then end the TCP connection."""
        if self.client_terminated:
            return
        self.client_terminated = True
        if not self.server_terminated:
            self.close_code = None if code in (None, 1005) else code
            self.close_reason = reason or None
            self.server_terminated = True  # an echo, not a close chatd starts: not counted
            if self.proto.state is ConnectionState.REMOTE_CLOSING:
                echo = self.proto.send(CloseConnection(code=code or 1005, reason=reason))
                try:
                    self._write(echo)
                except BufferFull:
                    self.drop_unsent()
                    self.max_buffer = None
                    self._write(echo)
            self._arm_close_timer()
        self._end_when_flushed()

    # -- closing --------------------------------------------------------------------

    def fail(self, code: int, reason: str, detail: str | None = None) -> None:
        """Close for a protocol violation of the client: logged (with wsproto's words), counted, then the
        usual close handshake."""
        if self.server_terminated:
            return
        app_log.warning(
            "ws_protocol_error",
            extra=fields(code=int(code), reason=(detail or reason)[:200], connection_id=self._id()),
        )
        self.close(int(code), reason)

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Send a close frame (``code`` None with a reason: 1000), then wait ``close_timeout_s`` for the client's."""
        if self.server_terminated:
            return
        self.handler.count_close_sent(code, reason)
        self.server_terminated = True
        if code is None and reason is not None:
            code = 1000
        payload = b"" if code is None else struct.pack("!H", code) + (reason or "").encode()[:123]
        try:
            try:
                self._write(bytes((0x88, len(payload))) + payload)
            except BufferFull:  # the handler's _overflow drops the queue first; anyone else: make room
                self.drop_unsent()
                self.max_buffer = None
                self._write(bytes((0x88, len(payload))) + payload)
        except StreamClosedError:
            self.abort()  # gone already: on_close follows
        if self.proto.state is ConnectionState.OPEN:
            self.proto.send(CloseConnection(code=code or 1005))  # wsproto's state follows (LOCAL_CLOSING)
        self._arm_close_timer()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None

    def _arm_close_timer(self) -> None:
        if self._closer is None:
            self._closer = self._loop.call_later(self.close_timeout_s, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now."""
        self.stream.close()

    def is_closing(self) -> bool:
        return self.server_terminated or self.client_terminated or self.stream.closed()

    def _end_when_flushed(self) -> None:
        if self._inflight or self._out:
            self._close_when_flushed = True
        else:
            self.stream.close()

    def _stream_closed(self) -> None:
        for timer in (self._closer, self._pinger):
            if timer is not None:
                timer.cancel()
        self._closer = self._pinger = None
        self._out.clear()
        self._out_bytes = 0
        self.handler._connection_closed(self)

    def _id(self) -> Any:
        return getattr(self.handler, "connection_id", None)

    # -- heartbeat ------------------------------------------------------------------

    def start_pinging(self, interval_s: float, timeout_s: float) -> None:
        if interval_s > 0:
            timeout_s = min(timeout_s or interval_s, interval_s)
            self._pinger = self._loop.call_later(interval_s, self._ping, interval_s, timeout_s)

    def _ping(self, interval_s: float, timeout_s: float) -> None:
        if self.is_closing():
            return
        self._pong = False
        self._ping_at = self._loop.time()
        try:
            self._write(_PING)
        except (BufferFull, StreamClosedError, OSError):
            return  # the writes that filled it close the socket, or the stream is gone
        self._pinger = self._loop.call_later(timeout_s, self._check_pong, interval_s, timeout_s)

    def _check_pong(self, interval_s: float, timeout_s: float) -> None:
        if self.is_closing():
            return
        if not self._pong:
            self.close(None, "ping timed out")
            return
        wait = max(0.0, self._ping_at + interval_s - self._loop.time())
        self._pinger = self._loop.call_later(wait, self._ping, interval_s, timeout_s)

    # -- writing ------------------------------------------------------------------------

    def write_frame(self, frame: bytes) -> None:
        """Pre-framed server text frames (``wsframe.ws_text_frame``): the same bytes for every socket, or,
        with permessage-deflate, their payloads compressed for this socket.  (Without deflate ``__init__``
        binds this name to ``_write`` itself: one call per delivery.)"""
        if self.deflate is None:
            self._write(frame)
        else:
            for payload in wsframe.ws_frame_payloads(frame):
                self._write(self._compressed(payload, 0x1))

    def send_message(self, message: str | bytes) -> None:
        """One message, text (str) or binary (bytes), in one frame."""
        if isinstance(message, str):
            payload, opcode = message.encode(), 0x1
        else:
            payload, opcode = message, 0x2
        if self.deflate is not None:
            self._write(self._compressed(payload, opcode))
        elif opcode == 0x1:
            self._write(wsframe.ws_text_frame(payload))
        else:
            self._write(wsframe.ws_frame(0x82, payload))

    def _compressed(self, payload: bytes, opcode: int) -> bytes:
        """RFC 7692 7.2.1: one deflated message, RSV1 set, the trailing 00 00 ff ff removed."""
        deflate = self.deflate
        assert deflate is not None
        compressor = self._compressor
        if compressor is None:
            compressor = self._compressor = zlib.compressobj(
                self._compression.get("compression_level", zlib.Z_DEFAULT_COMPRESSION),
                zlib.DEFLATED,
                -deflate.server_max_window_bits,
                self._compression.get("mem_level", 8),
            )
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        if deflate.server_no_context_takeover:
            self._compressor = None
        return wsframe.ws_frame(0xC0 | opcode, data[:-4] if data.endswith(b"\x00\x00\xff\xff") else data)

    def _write(self, data: bytes) -> None:
        if self._inflight or self._out:
            if self.max_buffer is not None and self._out_bytes + self._inflight + len(data) > self.max_buffer:
                raise BufferFull()
            self._out.append(data)
            self._out_bytes += len(data)
            return
        stream = self.stream
        if not stream.writing():  # nothing queued: one send(), no future, no IOStream bookkeeping
            sock = stream.socket
            if sock is None:
                raise StreamClosedError()
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:  # reset, broken pipe: the stream closes (on_close follows, scheduled)
                stream.close()
                raise StreamClosedError(real_error=exc) from exc
            if sent == len(data):
                return
            if sent:
                data = data[sent:]  # the rest of a frame: handed over now, never dropped
        self._hand(data)

    def _hand(self, data: bytes) -> None:
        self._inflight = len(data)
        self.stream.write(data).add_done_callback(self._written)

    def _written(self, fut: asyncio.Future[None]) -> None:
        self._inflight = 0
        if fut.cancelled() or fut.exception() is not None:
            return  # the stream closed: the read loop ends and reports it
        out = self._out
        if out:
            size = 0
            parts: list[bytes] = []
            while out and (not parts or size + len(out[0]) <= _WRITE_CHUNK):
                part = out.popleft()
                parts.append(part)
                size += len(part)
            self._out_bytes -= size
            self._hand(parts[0] if len(parts) == 1 else b"".join(parts))
        elif self._close_when_flushed:
            self.stream.close()

    def drop_unsent(self) -> int:
        """Drop the frames queued but not handed to the stream; the bytes dropped."""
        dropped = self._out_bytes
        self._out.clear()
        self._out_bytes = 0
        return dropped
