"""A local HTTP server (127.0.0.1) that serves shards and misbehaves on purpose, by the first part of the path:

    /ok/NAME          the file
    /flaky/NAME       503 the first time it is asked for, then the file
    /cut/NAME         the first time, half the file and a closed connection; then the file
    /gone/NAME        404, always
    /html/NAME        200 with an HTML error page
    /stall/NAME       the first 1024 bytes of the file, then nothing (until the server stops)

A query string is ignored (presigned URLs). `requests` counts the requests per path.
"""
from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


class ShardServer:
    def __init__(self, folder: Path):
        self.folder, self.requests, self.stop = folder, Counter(), threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = urlsplit(self.path).path
                server.requests[path] += 1
                kind, _, name = path.strip('/').partition('/')
                file = server.folder / name
                first = server.requests[path] == 1
                if kind == 'gone' or not file.is_file():
                    return self.send_error(404)
                if kind == 'flaky' and first:
                    return self.send_error(503)
                if kind == 'html':
                    return self._send(b'<!DOCTYPE html><html><body>Service Unavailable</body></html>', 'text/html')
                data = file.read_bytes()
                if kind == 'cut' and first:
                    return self._send(data, cut=len(data) // 2)
                if kind == 'stall':
                    self._send(data, cut=1024, close=False)
                    server.stop.wait(120)
                    return None
                return self._send(data)

            def _send(self, data: bytes, kind: str = 'application/x-tar', cut: int | None = None,
                      close: bool = True) -> None:
                self.send_response(200)
                self.send_header('Content-Type', kind)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data[:cut])
                self.wfile.flush()
                if cut is not None and close:
                    self.close_connection = True

        self.http = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.http.daemon_threads = True
        self.base = f'http://127.0.0.1:{self.http.server_address[1]}'
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> 'ShardServer':
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()

    def url(self, kind: str, name: str, query: str = '') -> str:
        return f'{self.base}/{kind}/{name}' + (f'?{query}' if query else '')
