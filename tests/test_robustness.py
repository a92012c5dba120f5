"""Hostile and absurd requests, crashes and source changes against a live daemon.

Every test starts ``tiled serve`` on loopback. Tests marked ``xfail(strict=True)``
document a bug that is still present: they fail once the bug is fixed, so the
mark must then be removed.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Daemon, http_get, sample
from tiled.slides import slide_id_for
from tiled.synthetic import write_slide

PATIENT_TEXT = ["DOE^JANE", "1970-01-01", "jdoe", "Jane Doe", "Biopsy"]

# Small output limits keep the "largest allowed image" cases fast.
LIMITS = {"max_width": 1024, "max_height": 1024, "max_area": 262144}

# The daemon checks source files for changes every 10 s.
CHANGE_CHECK_WAIT_SECONDS = 12


def raw_get(daemon: Daemon, target: str) -> tuple[int, dict, bytes]:
    """Send a request target byte for byte, without urllib's quoting."""
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        connection.putrequest("GET", target, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(daemon: Daemon, path: str, body: bytes) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        connection.request(
            "POST", path, body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except (BrokenPipeError, ConnectionResetError):
        # The daemon may close the socket before reading all of an oversized body.
        return 413, {}, b""
    finally:
        connection.close()


def assert_json_error(status: int, headers: dict, body: bytes, roots: list[Path]):
    assert 400 <= status < 500, (status, body[:200])
    assert "application/json" in headers.get("Content-Type", ""), headers
    assert "no-store" in headers.get("Cache-Control", ""), headers
    error = json.loads(body)
    assert error["status"] == status
    assert b"Traceback" not in body
    for root in roots:
        assert str(root).encode() not in body, body


def decodes(body: bytes) -> bool:
    try:
        Image.open(io.BytesIO(body)).load()
    except Exception:  # noqa: BLE001 - any decoder error means a corrupt tile
        return False
    return True


@pytest.fixture(scope="module")
def patient_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("robust-slides")
    write_slide(root / "patient.svs", 1900, 1500, aperio=True, label_text="DOE^JANE")
    (root / "sub").mkdir()
    write_slide(
        root / "sub" / "lossless.tif", 900, 700, compression="zlib", downsamples=(1, 4)
    )
    return root


@pytest.fixture(scope="module")
def daemon(patient_root, tmp_path_factory):
    store = tmp_path_factory.mktemp("robust-store") / "store"
    server = Daemon([patient_root], store, extra_config={"limits": LIMITS}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slide(daemon) -> str:
    return daemon.slide_id("patient.svs")


MALFORMED_TARGETS = [
    "/slides/..%2F..%2Fetc%2Fpasswd",
    "/slides/%2e%2e/%2e%2e/etc/passwd",
    "/slides/%252e%252e%252fetc%252fpasswd",
    "/slides/..\\..\\etc\\passwd",
    "/slides/a%00b",
    "/slides/{id}%00",
    "/slides/%2Fetc%2Fpasswd",
    "/slides/%ff%fe",
    "/slides/%E6%BC%A2%E5%AD%97",
    "/slides/{id}.dzi%00.jpeg",
    "/slides/{id}_files/-1/0_0.jpeg",
    "/slides/{id}_files/99999999999999999999/0_0.jpeg",
    "/slides/{id}_files/12/-1_0.jpeg",
    "/slides/{id}_files/12/0_99999.jpeg",
    "/slides/{id}_files/abc/0_0.jpeg",
    "/slides/{id}_files/12/0_0.gif",
    "/slides/{id}_files/12/0_0",
    "/slides/{id}_files/12/0_0_0.jpeg",
    "/slides/{id}_files/12/1e3_0.jpeg",
    "/slides/{id}_files/12/%2e%2e%2f0_0.jpeg",
    "/slides/{id}_files/12/%EF%BC%90_0.jpeg",
    "/slides/{id}_files/1" + "0" * 5000 + "/0_0.jpeg",
    "/slides/{id}/associated/..%2flabel.jpeg",
    "/iiif/3/..%2F..%2Fetc%2Fpasswd/info.json",
    "/iiif/3/{id}/full/256,/0/default.gif",
    "/iiif/3/{id}/full/256,/nan/default.jpg",
    "/iiif/3/{id}/full/256,/361/default.jpg",
    "/iiif/3/{id}/pct:0,0,1e-9,1e-9/max/0/default.jpg",
    "/slides/{id}/region?x=nan&y=0&width=10&height=10",
    "/slides/{id}/region?x=0&y=0&width=10&height=10&mpp=inf",
    "/slides/{id}/region?x=-99999999999&y=0&width=10&height=10",
    "/dicomweb/studies?limit=-1",
    "/dicomweb/studies/..%2f..%2f/metadata",
]


@pytest.mark.parametrize("target", MALFORMED_TARGETS)
def test_malformed_target_gets_json_error(daemon, slide, patient_root, target):
    status, headers, body = raw_get(daemon, target.replace("{id}", slide))
    assert_json_error(status, headers, body, [patient_root])


def test_overlong_target_gets_json_error(daemon, patient_root):
    status, headers, body = raw_get(daemon, "/slides/" + "a" * 9000)
    assert_json_error(status, headers, body, [patient_root])


ABSURD_TARGETS = [
    "/iiif/3/{id}/full/100000,100000/0/default.jpg",
    "/iiif/3/{id}/full/pct:100000/0/default.jpg",
    "/iiif/3/{id}/full/^pct:100000/0/default.jpg",
    "/iiif/3/{id}/full/^100000,/0/default.jpg",
    "/iiif/3/{id}/full/^1,100000/0/default.jpg",
    "/iiif/3/{id}/100000,100000,10,10/max/0/default.jpg",
    "/iiif/3/{id}/0,0,0,10/max/0/default.jpg",
    "/iiif/3/{id}/full/0,0/0/default.jpg",
    "/iiif/2/{id}/full/100000,100000/0/default.jpg",
    "/slides/{id}/region?x=0&y=0&width=1000000000&height=10",
    "/slides/{id}/region?x=0&y=0&width=0&height=10",
    "/slides/{id}/region?x=0&y=0&width=1024&height=1024",
    "/slides/{id}/region?x=0&y=0&width=10&height=10&level=99",
    "/slides/{id}/region?x=0&y=0&width=10&height=10&mpp=1e-300",
    "/slides/{id}/thumbnail?max_size=1000000000",
]


@pytest.mark.parametrize("target", ABSURD_TARGETS)
def test_absurd_size_is_rejected(daemon, slide, patient_root, target):
    status, headers, body = raw_get(daemon, target.replace("{id}", slide))
    assert status == 400, body[:200]
    assert_json_error(status, headers, body, [patient_root])


@pytest.mark.parametrize(
    "size", ["max", "^max", "full/full"], ids=["max", "upscaled-max", "iiif2-full"]
)
def test_largest_image_stays_within_limits(daemon, slide, size):
    if size == "full/full":
        path = f"/iiif/2/{slide}/full/full/359.99/default.jpg"
    else:
        path = f"/iiif/3/{slide}/full/{size}/359.99/default.jpg"
    status, _, body = daemon.get(path)
    assert status == 200, body[:200]
    width, height = Image.open(io.BytesIO(body)).size
    # Rotation by 359.99 degrees enlarges the canvas by at most a few pixels.
    assert width * height <= LIMITS["max_area"] * 1.01


def test_batch_over_tile_limit_is_400(daemon, slide, patient_root):
    body = json.dumps({"tiles": [[12, 0, 0]] * 5000}).encode()
    status, headers, reply = post(daemon, f"/slides/{slide}/tiles", body)
    assert status == 400
    assert_json_error(status, headers, reply, [patient_root])


def test_batch_oversized_body_is_413(daemon, slide):
    status, _, _ = post(daemon, f"/slides/{slide}/tiles", b"x" * (8 << 20))
    assert status == 413
    assert daemon.get("/healthz")[0] == 200


def test_batch_deeply_nested_json_is_400(daemon, slide, patient_root):
    body = b"[" * 30000 + b"]" * 30000
    status, headers, reply = post(daemon, f"/slides/{slide}/tiles", body)
    assert_json_error(status, headers, reply, [patient_root])


def test_dicomweb_frames_over_limit_is_400(daemon, slide):
    instances = daemon.get_json("/dicomweb/instances")
    instance = next(item for item in instances if item["00480006"]["Value"][0] == 1900)
    study = instance["0020000D"]["Value"][0]
    series = instance["0020000E"]["Value"][0]
    sop = instance["00080018"]["Value"][0]
    frames = ",".join(["1"] * 3000)
    path = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frames}"
    status, _, body = daemon.get(path)
    assert status == 400, body[:200]


def test_patient_text_absent_from_responses(daemon, slide, patient_root):
    paths = [
        "/slides",
        f"/slides/{slide}",
        f"/slides/{slide}.dzi",
        f"/iiif/3/{slide}/info.json",
        f"/iiif/2/{slide}/info.json",
        "/dicomweb/studies",
        "/dicomweb/instances",
        "/metrics",
        f"/slides/{slide}/associated/label.jpeg",
        f"/slides/{slide}/associated/macro.png",
        f"/slides/{slide}_files/99/0_0.jpeg",
        f"/slides/{slide}/region?x=0&y=0&width=10&height=10&mpp=1e-300",
    ]
    for study in daemon.get_json("/dicomweb/studies"):
        uid = study["0020000D"]["Value"][0]
        paths.append(f"/dicomweb/studies/{uid}/metadata")
    for path in paths:
        status, headers, body = daemon.get(path)
        text = body + json.dumps(headers).encode()
        for secret in PATIENT_TEXT:
            assert secret.encode() not in text, (path, secret)
        assert str(patient_root).encode() not in text, path


def test_label_and_macro_are_403(daemon, slide):
    for name in ("label.jpeg", "label.jpg", "macro.png"):
        status, headers, body = daemon.get(f"/slides/{slide}/associated/{name}")
        assert status == 403, name
        assert "no-store" in headers.get("Cache-Control", "")


def test_concurrent_first_requests_have_no_5xx(daemon):
    paths = []
    for entry in daemon.get_json("/slides")["slides"]:
        geometry = daemon.get_json(f"/slides/{entry['id']}")["deepzoom"]
        tile_size = geometry["tile_size"]
        for level, (width, height) in enumerate(geometry["level_dimensions"]):
            for col in range(-(-width // tile_size)):
                for row in range(-(-height // tile_size)):
                    for extension in ("jpeg", "png"):
                        paths.append(
                            f"/slides/{entry['id']}_files/{level}/{col}_{row}.{extension}"
                        )
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(daemon.get, paths))
    statuses = [status for status, _, _ in results]
    assert all(status == 200 for status in statuses), sorted(set(statuses))
    undecodable = [
        path
        for path, (_, _, body) in zip(paths, results, strict=True)
        if not decodes(body)
    ]
    assert undecodable == []
    assert daemon.alive()


def test_uint16_ome_tiff_coarse_tiles(make_daemon):
    path = sample("ome-tiff/tiledb-bioimaging/rand_uint16.ome.tiff")
    server = make_daemon([path.parent])
    slide = server.slide_id(path.name)
    geometry = server.get_json(f"/slides/{slide}")["deepzoom"]
    for level in range(geometry["level_count"]):
        status, _, body = server.get(f"/slides/{slide}_files/{level}/0_0.jpeg")
        assert status == 200, (level, body[:200])
    status, _, body = server.get(
        f"/slides/{slide}/region?x=0&y=0&width=32&height=32&level=2"
    )
    assert status == 200, body[:200]


def test_ingest_subfolder_uses_root_id(patient_root, tmp_path):
    command = [
        sys.executable, "-m", "tiled", "ingest", "--quiet",
        str(patient_root / "sub"), "--root", str(patient_root),
        "--store", str(tmp_path / "store"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line]
    assert [report["id"] for report in reports] == [slide_id_for("sub/lossless.tif")]


def test_sigkill_leaves_decodable_tiles(tmp_path):
    root = tmp_path / "slides"
    root.mkdir()
    write_slide(root / "big.svs", 3200, 2600, aperio=True)
    store = tmp_path / "store"
    first = Daemon([root], store).start()
    slide = first.slide_id("big.svs")
    geometry = first.get_json(f"/slides/{slide}")["deepzoom"]
    tile_size = geometry["tile_size"]
    paths = []
    for level, (width, height) in enumerate(geometry["level_dimensions"]):
        for col in range(-(-width // tile_size)):
            for row in range(-(-height // tile_size)):
                paths.append(f"/slides/{slide}_files/{level}/{col}_{row}.jpeg")
                paths.append(f"/slides/{slide}_files/{level}/{col}_{row}.png")

    def fetch(path):
        try:
            return http_get(first.url + path, timeout=10)[0]
        except OSError:
            return None

    pool = concurrent.futures.ThreadPoolExecutor(32)
    futures = [pool.submit(fetch, path) for path in paths]
    deadline = time.monotonic() + 30
    while sum(future.done() for future in futures) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    pool.shutdown(wait=True)
    completed = sum(1 for future in futures if future.result() == 200)
    assert completed < len(paths), "the daemon finished every tile before the kill"

    second = Daemon([root], store).start()
    try:
        for path in paths:
            status, _, body = second.get(path)
            assert status == 200, (path, body[:200])
            assert decodes(body), path
    finally:
        second.stop()


@pytest.fixture(scope="module")
def replaced_slides(tmp_path_factory):
    """Replace two served slides and report each one's tile before and after.

    ``plain.svs`` is replaced by a different file. ``same-stat.svs`` is replaced
    by a different file padded to the old size and given the old mtime, as
    ``cp -p`` or ``rsync -a`` of a rescanned slide can produce.
    """
    base = tmp_path_factory.mktemp("replaced")
    root = base / "slides"
    root.mkdir()
    spare = base / "spare"
    spare.mkdir()
    for name in ("plain.svs", "same-stat.svs"):
        write_slide(root / name, 700, 500, aperio=True, seed=7)
        write_slide(spare / name, 700, 500, aperio=True, seed=99)
    # Pad the smaller same-stat file, before the daemon opens it, so both match.
    original = root / "same-stat.svs"
    replacement = spare / "same-stat.svs"
    size = max(original.stat().st_size, replacement.stat().st_size)
    for path in (original, replacement):
        with open(path, "ab") as file:
            file.write(b"\0" * (size - path.stat().st_size))

    server = Daemon([root], base / "store").start()
    tiles = {}
    for name in ("plain.svs", "same-stat.svs"):
        slide = server.slide_id(name)
        path = f"/slides/{slide}_files/9/0_0.jpeg"
        _, headers, body = server.get(path)
        tiles[name] = {"path": path, "before": (headers.get("ETag"), body)}

    shutil.copy(spare / "plain.svs", root / ".plain.tmp")
    os.replace(root / ".plain.tmp", root / "plain.svs")
    old = os.stat(original)
    shutil.copy(replacement, root / ".same-stat.tmp")
    os.utime(root / ".same-stat.tmp", ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(root / ".same-stat.tmp", original)

    time.sleep(CHANGE_CHECK_WAIT_SECONDS)
    for tile in tiles.values():
        _, headers, body = server.get(tile["path"])
        tile["after"] = (headers.get("ETag"), body)
    server.stop()
    return tiles


def test_replaced_slide_serves_new_tiles(replaced_slides):
    tile = replaced_slides["plain.svs"]
    assert tile["after"][1] != tile["before"][1]
    assert tile["after"][0] != tile["before"][0]


def test_replacement_with_same_size_and_mtime(replaced_slides):
    tile = replaced_slides["same-stat.svs"]
    assert tile["after"][1] != tile["before"][1]
    assert tile["after"][0] != tile["before"][0]
