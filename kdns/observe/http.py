"""Tiny threaded HTTP listeners in the supervisor: health, readiness and metrics.

Why: Kubernetes probes and Prometheus need HTTP, and neither may ever sit on the packet
path: these threads run in the supervisor only, and metrics are read from the workers'
shared counter pages when Prometheus scrapes (docs/architecture.md, "What makes it fast").

What it must not do: touch DNS sockets or call into the workers. The listeners kdns serve
starts, their routes and the metrics are ``health``'s and ``metrics``'s.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


log = logging.getLogger("kdns.observe.http")


Route = Callable[[], tuple[int, str, bytes]]


def with_request(route):
    """Mark ``route`` as one that reads the request: it is called with the handler (its
    ``path``, ``headers``) and returns (status, content type, body, extra headers)."""
    def call(handler):
        return route(handler)
    call.wants_request = True
    return call


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Route] = {}

    def do_GET(self):
        extra = {}
        route = self.routes.get(self.path.split("?", 1)[0])
        if route is None:
            status, ctype, body = 404, "text/plain", b"not found"
        else:
            try:
                if getattr(route, "wants_request", False):
                    status, ctype, body, extra = route(self)
                else:
                    status, ctype, body = route()
            except Exception:  # noqa: BLE001 -- a broken scrape must not kill the listener
                log.exception("HTTP handler for %s failed", self.path)
                status, ctype, body = 500, "text/plain", b"internal error"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("http: " + fmt, *args)


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: after an image change every node-local following
    # the stream (kdns/serve/stream.py) reconnects at once, and a full backlog resets them.
    request_queue_size = 1024

    def server_bind(self):
        # HTTPServer.server_bind looks the bound address up in DNS (socket.getfqdn) for a
        # name nothing here uses; on a node whose resolver is the node-local itself, not
        # up yet, that lookup waits out every resolver timeout (20 s) before kdns starts.
        import socketserver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class HttpListener:
    """One ThreadingHTTPServer on its own daemon thread."""

    def __init__(self, host: str, port: int, routes: dict[str, Route]):
        handler = type("Handler", (_Handler,), {"routes": routes})
        server_class = _Server
        if ":" in host:
            import socket
            server_class = type("Server6", (_Server,), {"address_family": socket.AF_INET6})
        self.server = server_class((host, port), handler)   # OSError when the port is taken
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"http-{port}",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
