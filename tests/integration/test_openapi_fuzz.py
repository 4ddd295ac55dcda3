"""schemathesis against a live chatd: every operation of /api/v1/openapi.json, every check, with and without a token.

Three runs of the schemathesis CLI (``st run --checks all``, fixed seed, a bounded number of
examples per operation, one time budget per run) against one real chatd on a database of its
own: anonymous, as a user (owner of a room with a member, a message and a file), and as an
admin (the admin routes, aimed at a user of their own). Each run must end with 0 failures and
0 errors, and chatd's access log must show no 5xx, no traceback and no error line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from chatd.storage import migrations
from tests.chat import API, make_room
from tests.conftest import Services
from tests.support import Chatd, create_database, request
from tests.users import User, make_users

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

SEED = 20261201
MAX_EXAMPLES = 10  # per operation and phase (coverage, fuzzing, stateful)
RUN_BUDGET_S = 180  # each run, a hard stop for a hang (10 s quiet, 49 s at load 8; --max-time would be spent)
# DELETE /rooms/{room_id} archives (docs/API.md): the room stays readable with status "archived", so the
# use_after_free check's "deleted resource still available" does not apply to chatd's DELETEs.
NOT_APPLICABLE = "use_after_free"

# The CLI's file config: what the command line cannot say.
CONFIG = """
[auth]
auto-signup = false  # "without a token" means without one: no signing up on its own

# Path ids: half the cases aim at the fixture's room, file and user, the other half are generated.
[dictionaries.rooms]
values = ["{room_id}"]
[dictionaries.files]
values = ["{file_id}"]
[dictionaries.users]
values = ["{user_id}"]
[parameters]
"path.room_id" = {{ dictionary = "rooms", probability = 0.5 }}
"path.file_id" = {{ dictionary = "files", probability = 0.5 }}
"path.user_id" = {{ dictionary = "users", probability = 0.5 }}

# 413 too_large is how chatd rejects content over ws.max_message_chars (the socket's error code too):
# a rejection, like the 400s of the default list.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# An upload's type is sniffed from its bytes and checked against files.allowed_types: no schema can say
# which random bytes are an allowed file, so a schema-valid upload may get 415 (documented on the operation).
[[operations]]
include-operation-id = "FileUploadHandler.post"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "413", "415", "429"]

# from/to are each a valid date, but together must be ordered, at most 366 days apart and within 1970..9998
# (docs/API.md): a rule across parameters that no schema states, answered 400.
[[operations]]
include-operation-id = "AdminStatsHandler.get"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# Rules no static schema states (docs/API.md, Moderation), answered 400: a content rule's regex must compile
# as RE2 and not match the empty string; a report's reason is bounded by moderation.max_reason_chars and
# nobody reports their own message; nobody bans themselves.
[[operations]]
include-operation-id = "ContentRulesHandler.post"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
[[operations]]
include-operation-id = "ReportHandler.post"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
[[operations]]
include-operation-id = "ReportActionHandler.post"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]
"""

# Excluded from the user's run, because they end the session in use (every later case would be a 401):
# DELETE /me deactivates the account and POST /auth/logout revokes the token. The anonymous run covers
# both (401), tests/integration/test_auth.py and test_rooms_directory.py their effects.
ENDS_THE_SESSION = ("MeHandler.delete", "LogoutHandler.post")


def _schemathesis(server: Chatd, tmp: Path, name: str, token: str | None, *args: str) -> dict[str, Any]:
    """One ``st run``; its JSON report. Its output goes to ``<name>.txt`` (the failures, if any, in full)."""
    report = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(tmp / "schemathesis.toml"),
        "--no-color",
        "run",
        server.http + API + "/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--exclude-checks",
        NOT_APPLICABLE,
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",  # no examples carried over from another run: the same cases each time
        "--report",
        "json",
        "--report-json-path",
        str(report),
        *(["--header", f"Authorization: Bearer {token}"] if token else []),
        *args,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=RUN_BUDGET_S)
    elapsed = time.monotonic() - started
    (tmp / f"{name}.txt").write_text(proc.stdout + proc.stderr)
    assert report.exists(), f"schemathesis wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}"
    result: dict[str, Any] = json.loads(report.read_text())
    tested, cases = result["operations"]["tested"], result["test_cases"]["generated"]
    print(f"schemathesis {name}: {tested} operations, {cases} cases in {elapsed:.1f} s, exit {proc.returncode}")
    assert not result["failures"] and not result["errors"] and proc.returncode == 0, proc.stdout[-12000:]
    assert tested == result["operations"]["selected"] and cases > 0, proc.stdout[-4000:]
    return result


async def _fixture_data(server: Chatd, owner: User, member: User) -> tuple[int, int]:
    """A room of ``owner`` with ``member``, a text message and a file in it: (room id, file id)."""
    room = await make_room(server, owner, [member])
    r = await request(
        "POST", f"{server.http}{API}/rooms/{room}/messages", {"content": "hi", "client_msg_id": "c1"}, owner.token
    )
    assert r.status == 201, r.body
    boundary = "fuzzfixture"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="note.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nhello\r\n--{boundary}--\r\n"
    ).encode()
    r = await request(
        "POST",
        f"{server.http}{API}/rooms/{room}/files",
        token=owner.token,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        raw_body=body,
    )
    assert r.status == 201, r.body
    return room, int(r.body["data"]["file_id"])


async def test_schemathesis_finds_nothing(chatd_factory: Any, services: Services, tmp_path: Path) -> None:
    # A database of its own: the admin run bans, promotes and broadcasts.
    database_url = create_database(services.admin_url, "fuzz")
    migrations.apply(database_url)
    server: Chatd = chatd_factory(
        database_url=database_url,
        # Sends and look-ups cheap enough to let every case reach the handlers' logic rather than 429. Sign-ins
        # keep their limit (10 a minute): each costs an Argon2 run, and hundreds of them would take the budget.
        CHATD_AUTH_USER_LOOKUPS_PER_MIN="100000",
        CHATD_WS_SEND_RATE_COUNT="100000",
    )
    owner, member, victim = make_users(database_url, 3)
    (admin,) = make_users(database_url, 1, role="admin")
    room, file_id = await _fixture_data(server, owner, member)

    config = CONFIG.format(room_id=room, file_id=file_id, user_id=member.id)
    (tmp_path / "schemathesis.toml").write_text(config)
    started = time.monotonic()
    runs = [_schemathesis(server, tmp_path, "anonymous", None)]
    runs.append(
        _schemathesis(
            server,
            tmp_path,
            "user",
            owner.token,
            *[arg for op_id in ENDS_THE_SESSION for arg in ("--exclude-operation-id", op_id)],
        )
    )
    # The admin routes as an admin, their user ids aimed at a user of their own (ban, unban, role).
    (tmp_path / "schemathesis.toml").write_text(config.replace(f'["{member.id}"]', f'["{victim.id}"]'))
    runs.append(_schemathesis(server, tmp_path, "admin", admin.token, "--include-tag", "admin"))

    statuses = Counter(e["status"] for e in server.events("http_request"))
    print(
        f"schemathesis total: {sum(r['test_cases']['generated'] for r in runs)} cases in"
        f" {time.monotonic() - started:.1f} s; chatd answered {sum(statuses.values())} requests,"
        f" by status: {dict(sorted(statuses.items()))}"
    )
    assert not [s for s in statuses if s >= 500], statuses
    log = server.log()
    errors = [line for line in log.splitlines() if "Traceback" in line or '"level": "error"' in line]
    assert not errors, errors[:10]
