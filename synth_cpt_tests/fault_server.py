"""A real OpenAI-compatible chat server on 127.0.0.1 that misbehaves by a seeded schedule (tests only).

Every attempt that reaches it draws its fate from one `random.Random(seed)` stream: the first attempts of
the first requests to arrive are dealt each fault kind once (a seeded shuffle, so every kind is exercised
and each dealt fault leaves the request attempts to recover with); every other attempt is a fault with
probability `fault_rate`, else an answer. Answers are derived from the request (the document's words, pairs swapped: same language, same
length, not a copy), so a rewrite style's gate can accept them; no model runs. The server counts every
fault by kind and every attempt by the client's `X-Request-Id`, and it can stop and start again on the
same port (the `restart` fault does it by itself).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OK = "ok"
KINDS = (
    "http_500",  # 500 with an error body
    "http_503_date",  # 503 with Retry-After as an HTTP-date 1 s ahead (honoured)
    "http_429",  # 429 with Retry-After: 1 (honoured)
    "http_429_day",  # 429 with Retry-After: 86400 (over any sane ceiling: the request ends with this reason)
    "stall",  # nothing at all until well past the client's timeout
    "trickle",  # 200 and headers, then the body one byte at a time: every read is quick, the whole is too slow
    "drop",  # the connection is closed without a response
    "truncated",  # 200, a Content-Length, and half the body before the connection closes
    "not_json",  # 200 with a proxy's HTML page
    "restart",  # the connection is dropped and the server stops, then starts again on the same port
)


def echo_reply(body: dict[str, Any]) -> str:
    """The document of the last user message with each pair of words swapped: a stand-in rewrite."""
    user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    text = re.split(r"\n(?:Texto|Text|TEXTO)[^\n]*:\s*\n", user)[-1]
    words = text.split()
    for i in range(0, len(words) - 1, 2):
        words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def send(h: BaseHTTPRequestHandler, code: int, data: bytes, headers: dict[str, str] | None = None, content_type: str = "") -> None:
    """One whole HTTP response (JSON unless told), as every test server here answers."""
    h.send_response(code)
    h.send_header("Content-Type", content_type or "application/json")
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


class FaultServer:
    """Seeded faults per attempt; `faulty = False` answers everything (a healthy fleet, for a rerun)."""

    def __init__(
        self,
        seed: int,
        fault_rate: float = 0.35,
        timeout_s: float = 1.0,
        restart_down_s: float = 0.3,
        reply: Callable[[dict[str, Any]], str] = echo_reply,
    ) -> None:
        self.rng = random.Random(seed)
        # dealt from the end; the restart last: while the server is down attempts are refused without arriving,
        # so a card dealt after it could land on a request's last attempt, leaving nothing to recover with
        others = [k for k in KINDS if k != "restart"]
        self.rng.shuffle(others)
        self.deck = ["restart", *others]
        self.fault_rate = fault_rate
        self.timeout_s = timeout_s
        self.restart_down_s = restart_down_s
        self.reply = reply
        self.faulty = True
        self.faults: Counter[str] = Counter()  # injected, by kind
        self.hits: list[str] = []  # X-Request-Id of every attempt that reached the server, in order
        self.arrivals: dict[str, list[tuple[float, str]]] = {}  # request id -> (monotonic arrival, fate) of each of its attempts
        self.answered: Counter[str] = Counter()  # answers sent (200 with a full body), by request id
        self.restarts = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.port = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def fate(self, rid: str) -> str:
        """The fate of this attempt of request `rid`, drawn in arrival order (call with the lock held)."""
        if not self.faulty:
            return OK
        if self.deck and rid not in self.arrivals:
            return self.deck.pop()
        kinds = KINDS if not self.deck else [k for k in KINDS if k != "restart"]  # no restart before the deck's own
        return self.rng.choice(kinds) if self.rng.random() < self.fault_rate else OK

    def start(self) -> None:
        """Listen on `port` (0: a free one, kept for restarts)."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                rid = self.headers.get("X-Request-Id") or hashlib.sha256(raw).hexdigest()[:16]
                with server.lock:
                    kind = server.fate(rid)
                    server.hits.append(rid)
                    server.arrivals.setdefault(rid, []).append((time.monotonic(), kind))
                    if kind != OK:
                        server.faults[kind] += 1
                try:
                    server.act(self, kind, body, rid)
                except OSError:  # the client gave up first (timeout): nothing to answer
                    pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128  # a burst of connections is accepted, not left to SYN retries

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self._httpd = Quiet(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def act(self, h: BaseHTTPRequestHandler, kind: str, body: dict[str, Any], rid: str) -> None:
        if kind == "http_500":
            return send(h, 500, b'{"error": "internal error"}')
        if kind == "http_503_date":
            return send(h, 503, b'{"error": "overloaded"}', {"Retry-After": formatdate(time.time() + 1, usegmt=True)})
        if kind == "http_429":
            return send(h, 429, b'{"error": "rate limited"}', {"Retry-After": "1"})
        if kind == "http_429_day":
            return send(h, 429, b'{"error": "quota exhausted"}', {"Retry-After": "86400"})
        if kind == "stall":
            self.stopping.wait(self.timeout_s + 1.0)
            return None
        if kind in ("drop", "restart"):
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            if kind == "restart":
                threading.Thread(target=self.restart, daemon=True).start()
            return None
        data = self._answer(body)
        if kind == "trickle":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(len(data)):
                if self.stopping.wait(self.timeout_s / 4):
                    return None
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
            return None
        if kind == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        if kind == "not_json":
            return send(h, 200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        send(h, 200, data)
        with self.lock:
            self.answered[rid] += 1
        return None

    def _answer(self, body: dict[str, Any]) -> bytes:
        text = self.reply(body)
        return json.dumps(
            {
                "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(json.dumps(body.get("messages", []))) // 4, "completion_tokens": len(text.split())},
            }
        ).encode()

    def _close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def restart(self) -> None:
        """Stop listening (new connections are refused), stay down `restart_down_s`, listen again on the same port."""
        self._close()
        if self.stopping.wait(self.restart_down_s):
            return
        self.start()
        with self.lock:
            self.restarts += 1

    def stop(self) -> None:
        self.stopping.set()
        self._close()

    def figures(self) -> dict[str, Any]:
        return {"faults_by_kind": dict(sorted(self.faults.items())), "attempts": len(self.hits), "restarts": self.restarts}
