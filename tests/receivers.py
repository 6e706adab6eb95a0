"""Local stand-ins for the incident's receivers: a Slack-compatible webhook, a Statuspage API and
PagerDuty's Events API v2, as HTTP servers on loopback that record every request.

One class serves all three; what differs is the answer to a request that gets through. A
receiver can be told to fail, for the next N requests or for a while, the way a real one is down
or overloaded. Its error answers echo the request (path, authorization, body), as careless
receivers do, so tests can check that no credential travels on into an error message.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

JsonAnswer = tuple[int, Any]
"""HTTP status and the body (a str is sent as text, anything else as JSON)."""
_Reply = tuple[int, Any, dict[str, str]]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: Any
    """The JSON body, decoded."""
    status: int
    """What the receiver answered."""


Answer = Callable[[str, str, Any], JsonAnswer]
"""What a receiver that is up answers to (method, path, JSON body)."""


def slack_answer(_method: str, _path: str, _body: Any) -> JsonAnswer:
    return 200, "ok"


def pagerduty_answer(_method: str, _path: str, body: Any) -> JsonAnswer:
    return 202, {"status": "success", "message": "Event processed", "dedup_key": body["dedup_key"]}


def statuspage_answer(method: str, path: str, body: Any) -> JsonAnswer:
    """Create answers 201 with a new incident id; update answers 200 with the id in the path."""
    if method == "POST":
        return 201, {"id": f"sp{uuid.uuid4().hex[:12]}", **body["incident"]}
    return 200, {"id": path.rsplit("/", 1)[-1], **body["incident"]}


class Receiver:
    """An HTTP server on a free loopback port that records what it was sent."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._failures = 0
        self._failing_until = 0.0
        self._outage_seconds: float | None = None
        self._failure_status = 503
        self._retry_after: int | None = None
        self.requests: list[Request] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail_next(self, count: int, status: int = 503, retry_after: int | None = None) -> None:
        """Answer ``status`` to the next ``count`` requests, asking to wait ``retry_after`` s."""
        with self._lock:
            self._failures, self._failure_status = count, status
            self._retry_after = retry_after

    def fail_for(self, seconds: float, status: int = 503) -> None:
        """Answer ``status`` to the next request and every one in the ``seconds`` after it: an
        outage that starts when the receiver is first needed, however long the set-up took."""
        with self._lock:
            self._outage_seconds, self._failing_until = seconds, 0.0
            self._failure_status = status

    @property
    def accepted(self) -> list[Request]:
        """The requests answered with a 2xx: what the receiver took."""
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def _reply(self, method: str, path: str, headers: dict[str, str], body: Any) -> _Reply:
        with self._lock:
            if self._outage_seconds is not None:
                self._failing_until = time.monotonic() + self._outage_seconds
                self._outage_seconds = None
            failing = self._failures > 0 or time.monotonic() < self._failing_until
            if self._failures > 0:
                self._failures -= 1
            status, retry_after = self._failure_status, self._retry_after
        if failing:
            echo = f"cannot take {method} {path} ({headers.get('authorization')}): {body}"
            wait = {"retry-after": str(retry_after)} if retry_after is not None else {}
            reply: _Reply = (status, echo, wait)
        else:
            reply = (*self._answer(method, path, body), {})
        with self._lock:
            self.requests.append(Request(method, path, headers, body, reply[0]))
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = json.loads(raw) if raw else None
                status, reply, extra = receiver._reply(self.command, self.path, headers, body)
                text = reply if isinstance(reply, str) else json.dumps(reply)
                self.send_response(status)
                kind = "text/plain" if isinstance(reply, str) else "application/json"
                for name, value in {"content-type": kind, **extra}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(text.encode())

            do_POST = do_PATCH = _serve

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> Receiver:
        # A short poll: shutting down waits for the next one, in every test's teardown.
        serve = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def chat_receiver() -> Iterator[Receiver]:
    with Receiver(slack_answer) as receiver:
        yield receiver


@pytest.fixture
def status_page_receiver() -> Iterator[Receiver]:
    with Receiver(statuspage_answer) as receiver:
        yield receiver


@pytest.fixture
def pager_receiver() -> Iterator[Receiver]:
    with Receiver(pagerduty_answer) as receiver:
        yield receiver
