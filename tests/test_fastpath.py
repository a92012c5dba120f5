"""The hot-tile fast path: raw HTTP/1.1 on one connection, then aiohttp."""

from __future__ import annotations

import http.client
import re
import socket

import pytest

from tests.conftest import Daemon


@pytest.fixture(scope="module")
def daemon(synthetic_root, tmp_path_factory):
    instance = Daemon([synthetic_root], tmp_path_factory.mktemp("fast") / "store")
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def hot_tile(daemon) -> str:
    slide_id = daemon.slide_id("odd.svs")
    path = f"/slides/{slide_id}_files/13/2_2.jpeg"
    status, _, _ = daemon.get(path)
    assert status == 200
    return path


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
    """Read ``count`` responses from a keep-alive connection."""
    stream = sock.makefile("rb")
    responses = []
    for _ in range(count):
        status_line = stream.readline()
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = stream.readline().rstrip(b"\r\n")
            if not line:
                break
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", 0))
        responses.append((status, headers, stream.read(length)))
    return responses


def request(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def test_keepalive_tiles_then_other_routes(daemon, hot_tile):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(request(hot_tile) + request(hot_tile))
        first, second = read_responses(sock, 2)
        assert first[0] == second[0] == 200
        assert first[2] == second[2]
        assert first[1]["content-type"] == "image/jpeg"
        # A route the fast path does not serve moves the connection to aiohttp,
        # which then serves tiles too.
        sock.sendall(request("/healthz") + request(hot_tile))
        health, tile = read_responses(sock, 2)
        assert health[0] == 200
        assert b'"status":"ok"' in health[2]
        assert tile[2] == first[2]
        assert tile[1]["etag"] == first[1]["etag"]


def test_head_and_conditional(daemon, hot_tile):
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port)
    connection.request("GET", hot_tile)
    response = connection.getresponse()
    body = response.read()
    etag = response.getheader("ETag")
    assert re.fullmatch(r'"[0-9a-f]{16}-d-2-2-jpeg"', etag)
    assert response.getheader("Date")
    connection.request("HEAD", hot_tile)
    response = connection.getresponse()
    assert response.status == 200
    assert response.read() == b""
    assert int(response.getheader("Content-Length")) == len(body)
    connection.request("GET", hot_tile, headers={"If-None-Match": f"W/{etag}"})
    response = connection.getresponse()
    assert response.status == 304
    assert response.read() == b""
    connection.close()


def test_request_with_body_goes_to_aiohttp(daemon, hot_tile):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(
            request(hot_tile, "GET", "Content-Length: 5\r\n")
            + b"hello"
            + request(hot_tile)
        )
        first, second = read_responses(sock, 2)
        assert first[0] == 200
        assert second[0] == 200
        assert first[2] == second[2]


def test_connection_close_is_honoured(daemon, hot_tile):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(request(hot_tile, extra="Connection: close\r\n"))
        ((status, headers, _),) = read_responses(sock, 1)
        assert status == 200
        assert headers["connection"] == "close"
        sock.settimeout(5)
        assert sock.recv(1) == b""


def test_http10_keepalive(daemon, hot_tile):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        message = f"GET {hot_tile} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        sock.sendall(message.encode() * 2)
        responses = read_responses(sock, 2)
        assert [status for status, _, _ in responses] == [200, 200]
        assert responses[0][1]["connection"] == "keep-alive"


def test_split_and_malformed_heads(daemon, hot_tile):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        message = request(hot_tile)
        sock.sendall(message[:10])
        sock.sendall(message[10:])
        ((status, _, _),) = read_responses(sock, 1)
        assert status == 200
        sock.sendall(b"GET /\x00bad HTTP/1.1\r\n\r\n")
        ((status, headers, body),) = read_responses(sock, 1)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        assert headers["cache-control"] == "no-store"
        assert b'"status":400' in body


@pytest.mark.parametrize(
    ("message", "status"),
    [
        (b"GET /slides/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"b" * 20000 + b"\r\n\r\n", 431),
    ],
    ids=["long-line", "long-head"],
)
def test_oversized_heads_get_json(daemon, message, status):
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(message)
        ((got, headers, body),) = read_responses(sock, 1)
        assert got == status
        assert headers["content-type"].startswith("application/json")
        assert f'"status":{status}'.encode() in body


def test_fast_path_counts_metrics(daemon, hot_tile):
    def served() -> float:
        _, _, body = daemon.get("/metrics")
        total = 0.0
        for match in re.finditer(
            rb'tiled_tiles_served_total\{[^}]*cache="hit"[^}]*\} ([0-9.e+]+)', body
        ):
            total += float(match[1])
        return total

    before = served()
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(request(hot_tile) * 5)
        read_responses(sock, 5)
    assert served() - before == 5
