"""Rooms and real-time messaging against real chatd processes, Postgres and Valkey."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import psycopg
import pytest

from chatd.process.embedded import EmbeddedPostgres
from tests.chat import API, collect_messages, connect, join, make_room, send, send_many
from tests.conftest import Services
from tests.support import WS, Chatd, request
from tests.users import make_users


@pytest.fixture
def two_instances(chatd_factory: Any) -> tuple[Chatd, Chatd]:
    return chatd_factory(), chatd_factory(workers=2)


@pytest.mark.smoke
async def test_message_crosses_instances(two_instances: tuple[Chatd, Chatd], services: Services) -> None:
    a_srv, b_srv = two_instances
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(a_srv, alice, [bob])
    a, b = await connect(a_srv, alice), await connect(b_srv, bob)
    await join(a, room)
    await join(b, room)
    ack = await send(b, room, "hello from instance B")
    assert ack["type"] == "ack" and ack["seq"] == 1
    got = await a.expect("message", room_id=room)
    assert got["content"] == "hello from instance B" and got["sender_id"] == bob.id and got["seq"] == 1
    assert got["message_id"] == ack["message_id"]
    echo = await b.expect("message", room_id=room)  # the sender's own socket gets it too
    assert echo["seq"] == 1


async def test_fifty_senders_everyone_sees_everything_in_order(
    two_instances: tuple[Chatd, Chatd], services: Services
) -> None:
    servers = two_instances
    users = make_users(services.database_url, 50)
    room = await make_room(servers[0], users[0], users[1:])
    sockets = [await connect(servers[i % 2], u) for i, u in enumerate(users)]
    for ws in sockets:
        await join(ws, room)
    per_user = 3
    total = len(users) * per_user

    async def burst(ws: WS, i: int) -> list[dict[str, Any]]:
        return await send_many(ws, room, [f"m{i}-{k}" for k in range(per_user)])

    acks = await asyncio.gather(*(burst(ws, i) for i, ws in enumerate(sockets)))
    assert all(a["type"] == "ack" for batch in acks for a in batch)
    received = await asyncio.gather(*(collect_messages(ws, room, total) for ws in sockets))
    reference = [(m["seq"], m["message_id"]) for m in received[0]]
    assert [s for s, _ in reference] == list(range(1, total + 1))  # gap-free, strictly +1
    for got in received[1:]:
        assert [(m["seq"], m["message_id"]) for m in got] == reference  # same order everywhere
    assert sorted(a["seq"] for batch in acks for a in batch) == list(range(1, total + 1))


@pytest.mark.smoke
async def test_cut_connection_then_resume_without_loss_or_duplicate(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [bob])
    a, b = await connect(chatd, alice), await connect(chatd, bob)
    await join(a, room)
    await join(b, room)
    for i in range(5):
        await send(a, room, f"before-{i}")
    seen = await collect_messages(b, room, 5)
    last_seq = seen[-1]["seq"]
    b.conn.stream.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]  # TCP cut, no close handshake
    b.close()
    sending = asyncio.ensure_future(send_many(a, room, [f"during-{i}" for i in range(10)]))
    await asyncio.sleep(0.05)
    b2 = await connect(chatd, bob)
    joined = await join(b2, room, since_seq=last_seq)
    await sending
    for i in range(5):
        await send(a, room, f"after-{i}")
    replay_and_live = await collect_messages(b2, room, 15)
    seqs = [m["seq"] for m in replay_and_live]
    assert seqs == list(range(last_seq + 1, last_seq + 16)), seqs
    assert joined["last_seq"] >= last_seq
    with pytest.raises(asyncio.TimeoutError):
        await b2.expect("message", timeout_s=0.5, room_id=room)  # and nothing twice


async def test_resync_required_when_replay_too_long(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_REPLAY_LIMIT="3", CHATD_WS_SEND_RATE_COUNT="1000")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a = await connect(server, alice)
    for i in range(5):
        await send(a, room, f"m{i}")
    b = await connect(server, bob)
    await b.send({"type": "join", "room_id": room, "since_seq": 0, "id": "j"})
    await b.expect("joined", reply_to="j")
    resync = await b.expect("resync_required", reply_to="j")
    assert resync["room_id"] == room and resync["last_seq"] == 5
    r = await request("GET", f"{server.http}{API}/rooms/{room}/messages?after_seq=0&limit=3", token=bob.token)
    assert [m["seq"] for m in r.body["messages"]] == [1, 2, 3] and r.body["has_more"] is True


@pytest.mark.smoke
async def test_duplicate_client_msg_id_returns_original_ack(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    room = await make_room(chatd, alice, [])
    a = await connect(chatd, alice)
    first = await send(a, room, "once", cmid="retry-1")
    second = await send(a, room, "once", cmid="retry-1")
    assert second["type"] == "ack" and second["duplicate"] is True and first["duplicate"] is False
    assert (second["message_id"], second["seq"]) == (first["message_id"], first["seq"])
    via_rest = await request(
        "POST", f"{chatd.http}{API}/rooms/{room}/messages", {"content": "once", "client_msg_id": "retry-1"}, alice.token
    )
    assert via_rest.status == 200 and via_rest.body["message_id"] == first["message_id"]
    page = await request("GET", f"{chatd.http}{API}/rooms/{room}/messages", token=alice.token)
    assert len(page.body["messages"]) == 1


@pytest.mark.smoke
async def test_rest_send_reaches_sockets(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [bob])
    b = await connect(chatd, bob)
    await join(b, room)
    r = await request(
        "POST", f"{chatd.http}{API}/rooms/{room}/messages", {"content": "via REST", "client_msg_id": "r1"}, alice.token
    )
    assert r.status == 201 and r.body["seq"] == 1
    got = await b.expect("message", room_id=room)
    assert got["content"] == "via REST" and got["message_id"] == r.body["message_id"]


async def test_non_members_get_not_found_everywhere(chatd: Chatd, services: Services) -> None:
    alice, mallory = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [])
    for method, path in [("GET", ""), ("PATCH", ""), ("DELETE", ""), ("GET", "/messages"), ("POST", "/messages")]:
        body = (
            {"content": "x", "client_msg_id": "x"}
            if method == "POST"
            else ({"name": "x"} if method == "PATCH" else None)
        )
        r = await request(method, f"{chatd.http}{API}/rooms/{room}{path}", body, mallory.token)
        assert r.status == 404 and r.body["error"]["code"] == "not_found", (method, path, r.status)
    missing = await request("GET", f"{chatd.http}{API}/rooms/999999999", token=mallory.token)
    assert missing.status == 404 and missing.body == r.body | {"error": missing.body["error"]}
    m = await connect(chatd, mallory)
    for frame in (
        {"type": "join", "room_id": room, "id": "1"},
        {"type": "send", "room_id": room, "content": "x", "client_msg_id": "x", "id": "2"},
        {"type": "typing", "room_id": room, "is_typing": True, "id": "3"},
        {"type": "read", "room_id": room, "seq": 1, "id": "4"},
    ):
        await m.send(frame)
        err = await m.expect("error", reply_to=frame["id"])
        assert err["code"] == "not_found"


async def test_error_codes_keep_the_socket_open(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_MAX_MESSAGE_CHARS="50", CHATD_WS_SEND_RATE_COUNT="3")
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a, b = await connect(server, alice), await connect(server, bob)

    await a.send({"type": "send", "room_id": room, "id": "bad"})
    assert (await a.expect("error", reply_to="bad"))["code"] == "bad_request"
    await a.send({"type": "nope", "id": "unknown"})
    assert (await a.expect("error", reply_to="unknown"))["code"] == "bad_request"
    too_big = await send(a, room, "x" * 51)
    assert too_big["type"] == "error" and too_big["code"] == "too_large"

    acks = [await send(a, room, f"m{i}") for i in range(3)]
    assert all(x["type"] == "ack" for x in acks)
    limited = await send(a, room, "one too many")
    assert limited["type"] == "error" and limited["code"] == "rate_limited" and limited["retry_after_ms"] > 0
    page = await request("GET", f"{server.http}{API}/rooms/{room}/messages", token=alice.token)
    assert len(page.body["messages"]) == 3  # the limited one was not stored

    await b.send({"type": "edit", "message_id": acks[0]["message_id"], "content": "hijack", "id": "e"})
    assert (await b.expect("error", reply_to="e"))["code"] == "forbidden"
    await a.send({"type": "delete", "message_id": acks[0]["message_id"], "id": "d"})
    await a.send({"type": "edit", "message_id": acks[0]["message_id"], "content": "late", "id": "e2"})
    assert (await a.expect("error", reply_to="e2"))["code"] == "conflict"
    await a.send({"type": "auth", "token": "not-a-jwt", "id": "au"})
    assert (await a.expect("error", reply_to="au"))["code"] == "unauthorized"
    await a.send({"type": "ping", "id": "p"})
    assert (await a.expect("pong", reply_to="p"))["server_time"] > 0  # still open


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\x00\x01binary", 1003),
        ("x" * 70_000, 1009),
    ],
)
async def test_protocol_violations_close(chatd: Chatd, services: Services, payload: Any, code: int) -> None:
    (alice,) = make_users(services.database_url, 1)
    ws = await connect(chatd, alice)
    try:
        await ws.send(payload)
    except Exception:
        pass  # the server may already have closed
    closed_code, _ = await ws.closed()
    assert closed_code == code


async def test_three_invalid_json_frames_close_1007(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    ws = await connect(chatd, alice)
    for i in range(2):
        await ws.send("{not json")
        err = await ws.expect("error")
        assert err["code"] == "bad_request", i
    await ws.send("{still not json")
    code, _ = await ws.closed()
    assert code == 1007


async def test_send_gets_unavailable_when_postgres_is_down(
    chatd_factory: Any, own_postgres: tuple[EmbeddedPostgres, str], services: Services
) -> None:
    pg, url = own_postgres
    server: Chatd = chatd_factory(database_url=url, CHATD_STORAGE_PG_TIMEOUT_S="1")
    (alice,) = make_users(url, 1)
    room = await make_room(server, alice, [])
    ws = await connect(server, alice)
    await join(ws, room)
    ok = await send(ws, room, "stored")
    assert ok["type"] == "ack"
    pg.stop()
    reply = await send(ws, room, "must not be acked")
    assert reply["type"] == "error" and reply["code"] == "unavailable"
    pg.start()
    again = await send(ws, room, "after restart")
    deadline = time.monotonic() + 30  # the pool reconnects within a few attempts (seconds on a loaded machine)
    while again["type"] != "ack" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        again = await send(ws, room, "after restart")
    assert again["type"] == "ack" and again["seq"] == 2  # the refused one burned no seq


@pytest.mark.smoke
async def test_typing_read_edit_delete_presence(chatd_factory: Any, services: Services) -> None:
    # The second typing frame below is throttled only if chatd handles it within typing_interval_s of the
    # first: 2 s (not 0.5 s) so that a loaded machine's stall between two back-to-back frames cannot relay it.
    server: Chatd = chatd_factory(
        CHATD_WS_PRESENCE_GRACE_S="0.3", CHATD_WS_TYPING_TTL_S="3", CHATD_WS_TYPING_INTERVAL_S="2"
    )
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a = await connect(server, alice)
    await join(a, room)
    b_phone, b_laptop = await connect(server, bob), await connect(server, bob)
    await join(b_phone, room)
    online = await a.expect_presence(bob.id, "online")
    assert online["room_id"] == room and online["offline"] == []
    await join(b_laptop, room)  # a second socket of bob: no second "online"

    await b_phone.send({"type": "typing", "room_id": room, "is_typing": True})
    await b_phone.send({"type": "typing", "room_id": room, "is_typing": True})  # throttled
    t = await a.expect("typing", user_id=bob.id)
    assert t["is_typing"] is True
    expired = await a.expect("typing", user_id=bob.id, timeout_s=15)  # TTL 3 s; 15 s: still far from "never"
    assert expired["is_typing"] is False  # expired without a refresh

    ack = await send(a, room, "read me")
    await b_phone.send({"type": "read", "room_id": room, "seq": ack["seq"]})
    sync = await b_laptop.expect("read", room_id=room)
    assert sync == {"type": "read", "room_id": room, "user_id": bob.id, "seq": ack["seq"], "mention_count": 0}
    rooms = await request("GET", f"{server.http}{API}/rooms", token=bob.token)
    mine = next(r for r in rooms.body["rooms"] if r["id"] == room)
    assert mine["unread_count"] == 0 and mine["last_message"]["content"] == "read me"

    await a.send({"type": "edit", "message_id": ack["message_id"], "content": "edited"})
    upd = await b_laptop.expect("message_updated", message_id=ack["message_id"])
    assert upd["content"] == "edited" and upd["edited_at"]
    await a.send({"type": "delete", "message_id": ack["message_id"]})
    gone = await b_laptop.expect("message_deleted", message_id=ack["message_id"])
    assert gone["seq"] == ack["seq"]
    page = await request("GET", f"{server.http}{API}/rooms/{room}/messages", token=bob.token)
    tomb = page.body["messages"][-1]
    assert tomb["deleted"] is True and tomb["content"] == "" and tomb["seq"] == ack["seq"]

    b_phone.close()
    b_laptop.close()
    offline = await a.expect_presence(bob.id, "offline", timeout_s=15)  # grace 0.3 s
    assert offline["room_id"] == room
    for frame in a.backlog:
        assert not (frame["type"] == "presence" and bob.id in frame["online"])


async def test_quick_reconnect_does_not_flap_presence(chatd_factory: Any, services: Services) -> None:
    grace_s = 4.0  # the reconnect below must land within it: a handshake and a join, even on a loaded machine
    server: Chatd = chatd_factory(CHATD_WS_PRESENCE_GRACE_S=str(grace_s))
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a = await connect(server, alice)
    await join(a, room)
    b = await connect(server, bob)
    await join(b, room)
    await a.expect_presence(bob.id, "online")
    b.close()
    closed_at = time.monotonic()
    await asyncio.sleep(0.3)
    b2 = await connect(server, bob)
    await join(b2, room)
    # Listen past the grace period (+1 s of presence ticks): a flap would announce offline by then.
    with pytest.raises(asyncio.TimeoutError):
        await a.expect(
            "presence",
            timeout_s=max(0.5, closed_at + grace_s + 1 - time.monotonic()),
            where=lambda f: bob.id in f["online"] + f["offline"],
        )


async def test_slow_consumer_is_closed_others_keep_receiving(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(CHATD_WS_MAX_BUFFER_BYTES="65536", CHATD_WS_SEND_RATE_COUNT="100000")
    alice, bob, slow = make_users(services.database_url, 3)
    room = await make_room(server, alice, [bob, slow])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    # A raw socket that joins and then never reads, with a tiny receive buffer.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    raw.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {slow.token}\r\n\r\n"
        ).encode()
    )
    raw.recv(4096)
    join_frame = json.dumps({"type": "join", "room_id": room}).encode()
    mask = b"\x00\x00\x00\x00"
    raw.sendall(bytes([0x81, 0x80 | len(join_frame)]) + mask + join_frame)
    await a.expect_presence(slow.id, "online")  # its join was served: it is a member socket of the room
    big = "y" * 3900
    count = 1500  # ~6 MB: past the kernel socket buffers (tcp_wmem max 4 MiB) and the 64 KiB app buffer
    receiving = asyncio.ensure_future(collect_messages(b, room, count, timeout_s=60))  # b keeps up
    acks = await send_many(a, room, [big] * count)
    assert all(x["type"] == "ack" for x in acks)
    got = await receiving
    assert [m["seq"] for m in got] == list(range(1, count + 1))
    log = server.log()
    assert "slow_consumer_closed" in log
    raw.close()


async def test_removed_member_stops_receiving(chatd_factory: Any, services: Services) -> None:
    server: Chatd = chatd_factory(workers=2)
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    await join(b, room)
    r = await request("DELETE", f"{server.http}{API}/rooms/{room}/members/{bob.id}", token=alice.token)
    assert r.status == 204
    left = await b.expect("left", room_id=room)
    assert left["room_id"] == room
    await send(a, room, "not for bob")
    with pytest.raises(asyncio.TimeoutError):
        await b.expect("message", room_id=room, timeout_s=1)
    await b.send({"type": "join", "room_id": room, "id": "again"})
    assert (await b.expect("error", reply_to="again"))["code"] == "not_found"


@pytest.mark.parametrize("rejoin", [False, True])
async def test_a_removal_that_overtakes_a_join_wins(chatd_factory: Any, services: Services, rejoin: bool) -> None:
    """Bob's join has read his membership; before it ends, alice removes him. The join must not
    complete: the kick reached the socket while it was not yet joined, so it would have been ignored
    and Bob left receiving a room he is no longer in. (A rejoin: the kick's `left` comes, then the error.)"""
    server: Chatd = chatd_factory()
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(server, alice, [bob])
    a, b = await connect(server, alice), await connect(server, bob)
    await join(a, room)
    if rejoin:
        await join(b, room)
    assert (await send(a, room, "before"))["type"] == "ack"
    if rejoin:
        assert (await b.expect("message", room_id=room))["seq"] == 1
    with (
        psycopg.connect(services.database_url) as holder,
        psycopg.connect(services.database_url, autocommit=True) as probe,
    ):
        # The join reads membership (rooms, room_members), then its replay from `messages`: held here.
        # The probe matches the replay's own text (storage.messages._messages_in_ranges), not any query on
        # `messages`: the background indexer's read also waits on the lock, and it once stood in for the join.
        holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        await b.send({"type": "join", "room_id": room, "since_seq": 0, "id": "j"})
        deadline = time.monotonic() + 10
        while True:
            row = probe.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND query LIKE '%JOIN messages m ON m.room_id = r.room_id%'"
            ).fetchone()
            if row and row[0]:
                break
            assert time.monotonic() < deadline, "the join's replay never waited on the lock"
            await asyncio.sleep(0.05)
        # The removal commits and kicks at once; its `member_left` system message then waits on the lock.
        removal = asyncio.ensure_future(
            request("DELETE", f"{server.http}{API}/rooms/{room}/members/{bob.id}", token=alice.token)
        )
        await asyncio.sleep(1)  # the kick crosses Redis and reaches Bob's socket mid-join
        holder.rollback()
    assert (await removal).status == 204
    if rejoin:
        assert (await b.expect("left", room_id=room)).get("reply_to") is None
    reply = await b.expect_any(("joined", "error"), reply_to="j")
    assert (reply["type"], reply.get("code")) == ("error", "not_found"), reply
    assert (await send(a, room, "after"))["type"] == "ack"
    with pytest.raises(asyncio.TimeoutError):
        await b.expect("message", room_id=room, timeout_s=1)


async def test_invalid_utf8_closes_1007(chatd: Chatd, services: Services) -> None:
    (alice,) = make_users(services.database_url, 1)
    raw = socket.create_connection(("127.0.0.1", chatd.port))
    raw.sendall(
        (
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {alice.token}\r\n\r\n"
        ).encode()
    )
    raw.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += raw.recv(4096)
    assert data.startswith(b"HTTP/1.1 101")
    bad = b"\xff\xfe\xfd"
    raw.sendall(bytes([0x81, 0x80 | len(bad)]) + b"\x00\x00\x00\x00" + bad)
    buf = data.split(b"\r\n\r\n", 1)[1]

    def more() -> bytes:
        chunk = raw.recv(4096)
        assert chunk, f"connection closed without a close frame; had {buf!r}"
        return chunk

    close_code = None
    while close_code is None:  # read server frames (hello, ...) until the close frame
        while len(buf) < 2:
            buf += more()
        length = buf[1] & 0x7F
        header = 2
        if length == 126:
            while len(buf) < 4:
                buf += more()
            length, header = int.from_bytes(buf[2:4], "big"), 4
        while len(buf) < header + length:
            buf += more()
        opcode, payload, buf = buf[0] & 0x0F, buf[header : header + length], buf[header + length :]
        if opcode == 0x8:
            close_code = int.from_bytes(payload[:2], "big")
    raw.close()
    assert close_code == 1007


async def test_room_subroutes_do_not_fall_through(chatd: Chatd, services: Services) -> None:
    alice, bob = make_users(services.database_url, 2)
    room = await make_room(chatd, alice, [bob])
    for method, path in [("DELETE", "/members"), ("PATCH", "/messages"), ("DELETE", "/messages"), ("PUT", "/members")]:
        r = await request(
            method, f"{chatd.http}{API}/rooms/{room}{path}", {} if method == "PATCH" else None, alice.token
        )
        assert r.status == 405, (method, path, r.status)
        assert r.body["error"]["code"] == "method_not_allowed"
    still = await request("GET", f"{chatd.http}{API}/rooms/{room}", token=alice.token)
    assert still.body["status"] == "active"
    r = await request("GET", f"{chatd.http}{API}/rooms/{room}/messages?limit=%C2%B2", token=alice.token)
    assert r.status == 400
