"""One worker: the Tornado HTTP server on uvloop over the inherited (or its own SO_REUSEPORT) sockets.

It serves until SIGTERM/SIGINT, then shuts down in order (``app.Worker.shutdown``).  Under a master it
writes a heartbeat byte to its pipe every ``HEARTBEAT_S`` (the master's hang check); in-process
(``--workers 1``) it tells systemd itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from chatd.process import logs
from chatd.process.config import Settings
from chatd.process.logs import fields, server_log
from chatd.process.notify import Notifier


def bind(settings: Settings, reuse_port: bool = False) -> list[socket.socket]:
    from tornado.netutil import bind_sockets

    srv = settings.server
    return bind_sockets(srv.port, srv.host, backlog=srv.backlog, reuse_port=reuse_port)



async def _serve(
    settings: Settings,
    sockets: list[socket.socket],
    worker_id: int,
    ready_fd: int | None,
    notifier: Notifier,
    url: str = "",
) -> None:
    from tornado.httpserver import HTTPServer

    from chatd.api.files import STREAMED_BODIES
    from chatd.api.web import RequestLimits
    from chatd.process.app import Worker

    worker = await Worker.create(settings, worker_id)
    worker.start()
    server = HTTPServer(
        RequestLimits(worker.application(), settings.server, STREAMED_BODIES),  # 413 / 431 in JSON, unbuffered
        xheaders=False,  # X-Forwarded-For is honoured per peer, from server.trusted_proxies only (chatd.web)
        idle_connection_timeout=settings.ws.idle_timeout_s,
        **RequestLimits.server_options(settings.server),  # body deadline; the caps are RequestLimits' own
    )
    if not sockets:  # reuse_port mode: each worker binds its own SO_REUSEPORT socket
        sockets = bind(settings, reuse_port=True)
    server.add_sockets(sockets)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready_fd is None:  # in-process (--workers 1): no master to roll workers
        loop.add_signal_handler(
            signal.SIGHUP, lambda: server_log.warning("sighup_ignored", extra=fields(reason="single-process mode"))
        )
    server_log.info("worker_serving", extra=fields(worker_id=worker_id))
    if ready_fd is not None:
        heartbeat(loop, ready_fd)
    else:
        _in_process_notify(loop, notifier)
        logs.ready(url)

    await stop.wait()
    if ready_fd is None:
        notifier.stopping("stopping")
    await worker.shutdown(server)


def run_worker(
    settings: Settings,
    sockets: list[socket.socket],
    worker_id: int,
    ready_fd: int | None = None,
    notifier: Notifier | None = None,
    url: str = "",
) -> int:
    """Run one worker to its end; ``ready_fd``: the heartbeat pipe to the master, or None in-process, where
    ``notifier`` speaks to systemd and ``url`` is announced once it serves."""
    import uvloop

    logs.set_worker(f"w{worker_id}")
    try:
        uvloop.run(_serve(settings, sockets, worker_id, ready_fd, notifier or Notifier({}), url))
    except Exception:
        server_log.exception("worker_crashed", extra=fields(worker_id=worker_id))
        return 1
    return 0



HEARTBEAT_S = 1.0  # a worker writes one byte to its pipe this often


def heartbeat(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Worker side: "1" when serving, then a byte a second while the event loop runs (the master's hang check)."""
    os.set_blocking(fd, False)

    def beat() -> None:
        try:
            os.write(fd, b"1")
        except BlockingIOError:  # the master is busy: it knows we are alive from the earlier bytes
            pass
        except OSError:  # the master is gone
            return
        loop.call_later(HEARTBEAT_S, beat)

    beat()


def _in_process_notify(loop: asyncio.AbstractEventLoop, notifier: Notifier) -> None:
    """``--workers 1``: the one process is the main process; it tells systemd itself."""
    notifier.ready("serving: 1 in-process worker")
    interval = notifier.watchdog_interval_s
    if interval is None:
        return

    def ping() -> None:
        notifier.watchdog()  # the loop runs: that is all there is to check here
        loop.call_later(interval, ping)

    ping()

