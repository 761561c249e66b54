"""Idle connections: kept open for --keep-alive-s, then closed by the server (a real `agentprm serve`)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

from tests.conftest import start_server, stop_server


def _get_ready(sock: socket.socket, host: str) -> bytes:
    sock.sendall(f"GET /ready HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_an_idle_connection_is_reused_within_keep_alive_and_closed_after_it(tiny_checkpoint):
    proc, url = start_server(tiny_checkpoint, "--keep-alive-s", "1.5")
    try:
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
            assert _get_ready(sock, parsed.netloc).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)  # idle, within the keep-alive: the same connection serves the next request
            assert _get_ready(sock, parsed.netloc).startswith(b"HTTP/1.1 200")
            time.sleep(3.0)  # idle past it: the server has closed the connection (EOF)
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        stop_server(proc)
