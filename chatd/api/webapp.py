"""The web app: static files of ``chatd/static`` at ``/`` and ``/static/``, under a strict CSP.

No inline script or style, no HTML sink except DOMPurify's Trusted Types policy, and nothing
loaded from another origin.  Files are revalidated on every load (``no-cache`` + ETag), so
an upgrade never mixes old and new ES modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tornado.web

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",  # blob: attachments fetched with the bearer token
        "connect-src 'self'",  # CSP 3: 'self' covers ws:// and wss:// to this host
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    ]
)


class WebAppHandler(tornado.web.StaticFileHandler):
    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Cache-Control", "no-cache")

    def get_content_type(self) -> str:
        # Browsers refuse module scripts served as anything but JavaScript; Python 3.11 does not know .mjs.
        path = self.absolute_path or ""
        if path.endswith((".js", ".mjs")):
            return "text/javascript; charset=utf-8"
        if path.endswith(".html"):
            return "text/html; charset=utf-8"
        return super().get_content_type()


def routes() -> list[tuple[str, type[WebAppHandler], dict[str, Any]]]:
    static = {"path": str(STATIC_DIR)}
    return [
        (r"/()", WebAppHandler, {**static, "default_filename": "index.html"}),
        (r"/static/(.*)", WebAppHandler, static),
    ]
