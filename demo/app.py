"""The demo's tiny application, one per workload: `app.py NAME PORT [NEXT_URL] [--echo PORT]`.

GET / answers `NAME (called by <the caller's SPIFFE ID>)`, the identity Envoy put in
x-forwarded-client-cert after the mTLS handshake; with NEXT_URL it first calls that URL (through
its own sidecar, as any application would) and appends the answer, indented. With `--echo PORT`
it also runs a TCP echo service there (the demo's plain TCP service).
"""

from __future__ import annotations

import http.server
import socketserver
import sys
import threading
import urllib.request


def caller(xfcc: str) -> str:
    for part in xfcc.split(";"):
        if part.startswith("URI="):
            return part[4:]
    return "no client certificate"


def main() -> None:
    args = sys.argv[1:]
    echo = None
    if "--echo" in args:
        at = args.index("--echo")
        echo = int(args[at + 1])
        del args[at:at + 2]
    name, port, following = args[0], int(args[1]), args[2] if len(args) > 2 else ""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  http.server's naming
            text = f"{name} (called by {caller(self.headers.get('x-forwarded-client-cert', ''))})\n"
            if following:
                with urllib.request.urlopen(following, timeout=10) as answer:
                    text += "".join(f"  {line}\n" for line in answer.read().decode().splitlines())
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"echo: " + self.rfile.readline())

    if echo:
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("0.0.0.0", echo), Echo)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    web = Server(("0.0.0.0", port), Handler)
    print("ready", flush=True)
    web.serve_forever()


class Server(http.server.ThreadingHTTPServer):
    def server_bind(self) -> None:
        """Without HTTPServer's reverse lookup of its own address: the pod's DNS goes to the agent,
        which starts after the application."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "app", self.server_address[1]


if __name__ == "__main__":
    main()
