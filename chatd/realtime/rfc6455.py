"""RFC 6455 as chatd speaks it: Tornado's ``WebSocketProtocol13`` made strict, and closes a client sees.

Tornado's server side accepts what RFC 6455 says to refuse, and fails what it
refuses by dropping the TCP connection.  ``StrictProtocol`` (one subclass, the
frame reader replaced) changes that:

* a protocol error (unmasked client frame, reserved bits, unknown opcode,
  fragmented or oversized control frame, a continuation out of place, a close
  frame with an invalid code or a one-byte payload) is answered with a close
  frame ``1002``, never by echoing an invalid code (RFC 6455 7.4: 1005, 1006 and
  1015 must never be sent);
* invalid UTF-8 in a text message closes ``1007`` as soon as the bad byte
  arrives (fail fast: at the fragment, even in the middle of a frame), not at
  the end of the message;
* a frame over the size limit gets ``1009`` and its payload is read and
  discarded, not buffered, so the client's write completes and it reads the
  1009 instead of a connection reset;
* after chatd sent a close frame, whatever the client still sends is read and
  discarded until its close frame arrives, for at most ``close_timeout_s``;
  then the TCP connection is dropped.  Data frames are no longer delivered;
* ``drop_unsent()`` (slow consumer): the frames queued for a client that does
  not read are dropped (a frame already half sent is finished), so the close
  frame that follows is next on the wire instead of behind ``max_buffer_bytes``.

Every protocol-violation close is logged (``ws_protocol_error``); every close chatd sends is counted once.
"""

from __future__ import annotations

import codecs
import collections
import struct
from asyncio import Future

import tornado.websocket
from tornado.iostream import IOStream
from tornado.util import _websocket_mask
from tornado.websocket import WebSocketProtocol, WebSocketProtocol13

from chatd.core.errors import CloseCode
from chatd.process.logs import app_log, fields

_READ_CHUNK = 65_536  # payloads are read (and discarded, or checked for UTF-8) in pieces this big
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 7.4.1/7.4.2, the IANA registry): never 1004-1006, 1015, or < 1000."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def _unmask(mask: bytes, offset: int, data: bytes) -> bytes:
    shift = offset % 4
    return _websocket_mask(mask[shift:] + mask[:shift], data) if data else data


class StrictProtocol(WebSocketProtocol13):
    """Server side only (chatd never masks); install with ``StrictProtocol.adopt``."""

    close_timeout_s: float = 5.0
    _utf8: codecs.IncrementalDecoder | None = None  # the text message being received, when fragmented or chunked
    _frame_ends: collections.deque[int] | None = None

    @classmethod
    def adopt(cls, proto: WebSocketProtocol | None, close_timeout_s: float) -> WebSocketProtocol | None:
        """Turn the protocol Tornado built for a handler into this class (no second constructor to keep in sync)."""
        if isinstance(proto, WebSocketProtocol13):
            proto.__class__ = cls
            assert isinstance(proto, StrictProtocol)
            proto.close_timeout_s = close_timeout_s
            proto._frame_ends = collections.deque()
        return proto

    # -- reading ----------------------------------------------------------------------

    async def _receive_frame(self) -> None:
        head = await self._read_bytes(2)
        fin = bool(head[0] & self.FIN)
        reserved = head[0] & self.RSV_MASK
        opcode = head[0] & self.OPCODE_MASK
        masked = bool(head[1] & 0x80)
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", await self._read_bytes(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", await self._read_bytes(8))[0]
        mask = await self._read_bytes(4) if masked else b""
        if self.server_terminated:  # closing: only the client's close frame matters now
            await self._after_close(opcode, length, mask)
            return
        if self._decompressor is not None and opcode != 0:
            self._frame_compressed = bool(reserved & self.RSV1)
            reserved &= ~self.RSV1
        problem = self._frame_problem(fin, reserved, opcode, masked, length)
        if problem is not None:
            self.fail(CloseCode.PROTOCOL_ERROR, problem)
            await self._discard(length)
            return
        is_control = bool(opcode & 0x8)
        buffered = len(self._fragmented_message_buffer or b"") if opcode == 0 else 0
        if not is_control and length + buffered > self.params.max_message_size:
            self.fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
            await self._discard(length)
            return
        text = opcode == 0x1 or (opcode == 0 and self._fragmented_message_opcode == 0x1)
        if text and not self._frame_compressed:
            data = await self._read_text(length, mask, single=fin and opcode == 0x1)
            if data is None:
                return  # invalid UTF-8: closed 1007
        else:
            data = _unmask(mask, 0, await self._read_bytes(length))
        if opcode == 0:
            assert self._fragmented_message_buffer is not None
            self._fragmented_message_buffer.extend(data)
            if not fin:
                return
            opcode = self._fragmented_message_opcode or 0
            data = bytes(self._fragmented_message_buffer)
            self._fragmented_message_buffer = None
        elif not is_control and not fin:
            self._fragmented_message_opcode = opcode  # type: ignore[assignment]  # Tornado annotates it None
            self._fragmented_message_buffer = bytearray(data)
            return
        if text:
            self._utf8 = None  # the message is complete
        handled = self._handle_message(opcode, data)
        if handled is not None:
            await handled

    def _frame_problem(self, fin: bool, reserved: int, opcode: int, masked: bool, length: int) -> str | None:
        if not masked:
            return "unmasked client frame"
        if reserved:
            return "reserved bits set"
        if opcode & 0x8:
            if opcode not in (0x8, 0x9, 0xA):
                return f"unknown opcode {opcode}"
            if not fin:
                return "fragmented control frame"
            if length > 125:
                return "control frame over 125 bytes"
        elif opcode == 0:
            if self._fragmented_message_buffer is None:
                return "continuation frame without a message"
        elif opcode in (0x1, 0x2):
            if self._fragmented_message_buffer is not None:
                return "new message inside a fragmented one"
        else:
            return f"unknown opcode {opcode}"
        return None

    async def _read_text(self, length: int, mask: bytes, single: bool) -> bytes | None:
        """The unmasked payload, its UTF-8 checked piece by piece as it arrives; None once closed 1007."""
        first = _unmask(mask, 0, await self._read_partial(length))
        if single and len(first) == length:
            return first  # the usual small frame: Tornado's decode checks it whole
        decoder = self._utf8 = self._utf8 or _utf8_decoder()
        pieces = [first]
        got = len(first)
        try:
            decoder.decode(first)
            while got < length:
                piece = _unmask(mask, got, await self._read_partial(length - got))
                got += len(piece)
                pieces.append(piece)
                decoder.decode(piece)
        except UnicodeDecodeError:
            self.fail(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
            await self._discard(length - got)
            return None
        return b"".join(pieces)

    async def _read_partial(self, n: int) -> bytes:
        data = await self.stream.read_bytes(min(n, _READ_CHUNK), partial=True) if n else b""
        self._wire_bytes_in += len(data)
        return data

    async def _discard(self, n: int) -> None:
        """Read ``n`` payload bytes without keeping them (bounded by the close timeout)."""
        while n > 0:
            n -= len(await self._read_partial(n))

    async def _after_close(self, opcode: int, length: int, mask: bytes) -> None:
        if opcode == 0x8 and length <= 125:
            self._handle_message(opcode, _unmask(mask, 0, await self._read_bytes(length)))
        else:
            await self._discard(length)

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if opcode in (0x1, 0x2) and self.server_terminated:
            return None  # chatd already said goodbye: the message is not delivered
        if opcode == 0x1 and not self._frame_compressed:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                self.fail(CloseCode.INVALID_PAYLOAD, "invalid UTF-8")
                return None
        if opcode == 0x8 and not self.server_terminated:
            problem = self._close_problem(data)
            if problem is not None:
                self.client_terminated = True
                code, reason = problem
                self.fail(code, reason)
                return None
        return super()._handle_message(opcode, data)

    @staticmethod
    def _close_problem(data: bytes) -> tuple[CloseCode, str] | None:
        if len(data) == 1:
            return CloseCode.PROTOCOL_ERROR, "close frame of one byte"
        if len(data) >= 2:
            code = struct.unpack("!H", data[:2])[0]
            if not valid_close_code(code):
                return CloseCode.PROTOCOL_ERROR, f"invalid close code {code}"
            try:
                data[2:].decode("utf-8")
            except UnicodeDecodeError:
                return CloseCode.INVALID_PAYLOAD, "close reason is not UTF-8"
        return None

    def fail(self, code: CloseCode, reason: str) -> None:
        """Close for a protocol violation of the client: logged, counted, then the usual close handshake."""
        if self.server_terminated:
            return
        app_log.warning(
            "ws_protocol_error",
            extra=fields(code=int(code), reason=reason, connection_id=getattr(self.handler, "connection_id", None)),
        )
        self._count_close(int(code), reason)  # before close(): a client close frame may have come first
        self.close(int(code), reason)

    def _count_close(self, code: int | None, reason: str | None) -> None:
        """Every close chatd sends is counted once, by the handler (``ChatSocket.count_close_sent``)."""
        counter = getattr(self.handler, "count_close_sent", None)
        if counter is not None:
            counter(code, reason)

    # -- closing ----------------------------------------------------------------------

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if not self.server_terminated and not self.client_terminated:  # chatd's closes and Tornado's (ping timeout)
            self._count_close(code, reason)
        waiting = self._waiting
        super().close(code, reason)
        if waiting is None and self._waiting is not None:  # Tornado's fixed 5 s -> close_timeout_s
            loop = self.stream.io_loop
            loop.remove_timeout(self._waiting)
            self._waiting = loop.add_timeout(loop.time() + self.close_timeout_s, self._abort)

    # -- writing ------------------------------------------------------------------------

    def _write_frame(self, fin: bool, opcode: int, data: bytes, flags: int = 0) -> Future[None]:
        future = super()._write_frame(fin, opcode, data, flags)
        self.note_write()
        return future

    def note_write(self) -> None:
        """Remember where the frame just handed to the stream ends, while the stream is still sending."""
        stream, ends = self.stream, self._frame_ends
        if ends is None:
            return
        if not stream.writing():
            ends.clear()
            return
        done = stream._total_write_done_index
        while ends and ends[0] <= done:
            ends.popleft()
        ends.append(stream._total_write_index)

    def drop_unsent(self) -> int:
        """Drop the frames queued but not started; returns the bytes dropped.  Relies on IOStream internals
        (stable across Tornado 6.x): the write buffer and its two running byte counters."""
        stream: IOStream = self.stream
        ends = self._frame_ends or collections.deque()
        buffer = stream._write_buffer
        done = stream._total_write_done_index
        keep = next((end for end in ends if end > done), done) - done  # the rest of a half-sent frame
        dropped = len(buffer) - keep
        if dropped <= 0:
            return 0
        head = bytearray()
        while len(head) < keep:
            piece = buffer.peek(keep - len(head))
            head += piece
            buffer.advance(len(piece))
        fresh = type(buffer)()
        fresh.append(head)
        stream._write_buffer = fresh
        stream._total_write_index = done + keep
        ends.clear()
        if keep:
            ends.append(done + keep)
        return dropped


class StrictHandlerMixin(tornado.websocket.WebSocketHandler):
    """Handlers speaking through ``StrictProtocol``: ``close_timeout_s`` set by the subclass."""

    close_timeout_s: float = 5.0

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        return StrictProtocol.adopt(super().get_websocket_protocol(), self.close_timeout_s)


class EchoSocket(StrictHandlerMixin):
    """TEST ONLY (``ws.test_echo_route``): echoes every message, for the Autobahn conformance cases.

    The same protocol class, size limit and close timeout as ``/ws``; no
    authentication, so it is never routed unless that setting is on.
    """

    def initialize(self, close_timeout_s: float) -> None:
        self.close_timeout_s = close_timeout_s

    def on_message(self, message: str | bytes) -> None:
        self.write_message(message, binary=isinstance(message, bytes))

    def check_origin(self, origin: str) -> bool:
        return True
