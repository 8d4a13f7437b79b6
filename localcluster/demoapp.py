"""The demo's workload: an HTTP server that says which pod answered.

``python -m localcluster.demoapp --port 8080`` answers every GET with one line,
``hello from <pod> in <namespace>``, naming the pod from the environment that
`meshgate cluster run-pod` sets (POD_NAME, POD_NAMESPACE). A POST is answered
``posted <body> to <pod> in <namespace>`` and logged on stdout as
``served POST <body>``, one line each, so that a caller can count at the server
how often each request was delivered. It listens on 127.0.0.1 only: callers reach
it through the pod's proxy.
"""

from __future__ import annotations

import argparse
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out in two writes; with Nagle's algorithm the body
    # waits for the peer's delayed ACK of the head, ~40 ms per answer on keep-alive.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._answer(f"hello from {_where()}\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        text = self.rfile.read(length).decode(errors="replace").strip()
        # One write per line: the server answers on several threads.
        sys.stdout.write(f"served POST {text}\n")
        sys.stdout.flush()
        self._answer(f"posted {text} to {_where()}\n")

    def _answer(self, text: str) -> None:
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def _where() -> str:
    return f"{os.environ.get('POD_NAME', '?')} in {os.environ.get('POD_NAMESPACE', '?')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _Hello)
    print(f"demo app serving on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
