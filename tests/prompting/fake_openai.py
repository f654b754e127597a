"""A small, real HTTP server on 127.0.0.1 that speaks the OpenAI wire format, scripted by the test.

``FakeOpenAI`` answers ``POST /v1/chat/completions`` and ``POST /v1/completions``. Each request takes
the next scripted ``Reply`` (the last one repeats once the script runs out) and is recorded with its
path, headers and JSON body, so a test can check what the client really sent.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    # A dict or list is sent as JSON; a str is sent as is (for non-JSON bodies).
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


def chat_reply(content: str | None, total_tokens: int | None = None) -> Reply:
    body: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": content}}]}
    if total_tokens is not None:
        body["usage"] = {"total_tokens": total_tokens}
    return Reply(200, body)


def completion_reply(text: str, total_tokens: int | None = None) -> Reply:
    body: dict[str, Any] = {"choices": [{"text": text}]}
    if total_tokens is not None:
        body["usage"] = {"total_tokens": total_tokens}
    return Reply(200, body)


def error_reply(status: int, message: str = "error", headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"error": {"message": message}}, headers or {})


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeOpenAI:
    """``with FakeOpenAI([reply, ...]) as server: ... server.base_url ... server.requests``."""

    PATHS = ("/v1/chat/completions", "/v1/completions")

    def __init__(self, script: list[Reply] | None = None) -> None:
        self.script: list[Reply] = list(script or [chat_reply("1. a\n2. b")])
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -----------------------------------------------------------------------------

    def set_script(self, script: list[Reply]) -> None:
        with self._lock:
            self.script = list(script)

    def _next(self) -> Reply:
        with self._lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def _reply_to(self, body: Any) -> Reply:
        """The reply to a request with this JSON body: the script's next (a subclass may choose by
        what was asked)."""
        return self._next()

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
                pass

            def do_POST(self):  # noqa: N802 - the name http.server calls
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                with fake._lock:
                    fake.requests.append(Received("POST", self.path, dict(self.headers.items()), body))
                if self.path not in fake.PATHS:
                    self._send(error_reply(404, f"no route {self.path}"))
                    return
                self._send(fake._reply_to(body))

            def _send(self, reply: Reply) -> None:
                if isinstance(reply.body, str):
                    data, ctype = reply.body.encode(), "text/plain; charset=utf-8"
                else:
                    data, ctype = json.dumps(reply.body).encode(), "application/json"
                self.send_response(reply.status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
