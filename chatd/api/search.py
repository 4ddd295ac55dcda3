"""``GET /search``: the messages of the caller's rooms (text, semantic or hybrid)."""

from __future__ import annotations

from typing import Any

from chatd.api.base import QUERY_NOT_BLANK, ApiHandler
from chatd.api.openapi import Param, op
from chatd.api.responses import SearchResults
from chatd.services.search import MODES, Search


class SearchHandler(ApiHandler):
    search: Search

    def initialize(self, search: Search, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.search = search

    @op(
        summary="Search the messages of your rooms (text, semantic or hybrid)",
        tag="search",
        query=(
            Param(
                "q", {"type": "string", "minLength": 1, "maxLength": 500, "pattern": QUERY_NOT_BLANK}, "the query", True
            ),
            Param("room_id", {"type": "integer", "minimum": 1}, "only this room (yours)"),
            Param("mode", {"type": "string", "enum": list(MODES), "default": "text"}),
            Param("limit", {"type": "integer", "minimum": 1, "maximum": 50, "default": 20}),
            Param("cursor", {"type": "integer", "minimum": 0, "maximum": 1000}, "next_cursor of the previous page"),
        ),
        responses={200: ("Ranked hits", SearchResults)},
    )
    async def get(self) -> None:
        principal = await self.auth()
        room_id = self.arg("room_id")
        if room_id is not None:
            await self.rooms.member_room(room_id, principal.user_id)  # 404 for other rooms
        self.send_json(
            await self.search.search(
                principal.user_id, self.arg("q"), room_id, self.arg("mode"), self.arg("limit"), self.arg("cursor") or 0
            )
        )
