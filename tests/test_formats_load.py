"""Concurrent first requests across many small slides of mixed formats.

50 synthetic slides (SVS-like JPEG, lossless TIFF, OME-TIFF and DICOM) are
served by one daemon; 64 concurrent first requests for tiles that are in no
store yet must all succeed with no 5xx and no worker death.
"""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest
import tifffile

from tiled.slides import slide_id_for
from tiled.synthetic import tissue_pixels, write_slide

pytestmark = pytest.mark.slow

SLIDE_COUNT = 50
REQUESTS = 64


def write_ome(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3000, size=(2, 600, 500), dtype=np.uint16)
    tifffile.imwrite(
        path,
        data,
        ome=True,
        tile=(256, 256),
        compression="zlib",
        metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    pytest.importorskip("wsidicom")
    from tests.test_formats import write_dicom

    root = tmp_path_factory.mktemp("mixed")
    names = []
    for index in range(SLIDE_COUNT):
        kind = index % 4
        if kind == 0:
            name = f"s{index:02d}.svs"
            write_slide(root / name, 700, 600, aperio=True, seed=index)
        elif kind == 1:
            name = f"s{index:02d}.tif"
            write_slide(root / name, 600, 500, compression="zlib", seed=index)
        elif kind == 2:
            name = f"s{index:02d}.ome.tif"
            write_ome(root / name, index)
        else:
            name = f"s{index:02d}.dcm"
            write_dicom(root / name, width=300, height=200, tile=64)
        names.append(name)
    # One strip-based single-level TIFF among them.
    tifffile.imwrite(
        root / "strips.tif", tissue_pixels(0, 0, 900, 700, 1.0), rowsperstrip=32
    )
    names.append("strips.tif")
    return root, names


def test_concurrent_first_requests_mixed_formats(mixed_root, make_daemon):
    root, names = mixed_root
    daemon = make_daemon([root], extra_config={"server": {"threads": 4}})
    paths = []
    for index in range(REQUESTS):
        name = names[index % len(names)]
        slide_id = slide_id_for(name)
        # Full-resolution and a coarse level: both are made on first request.
        z = 9 if index % 2 else 5
        extension = "png" if index % 3 == 0 else "jpeg"
        paths.append(f"/slides/{slide_id}_files/{z}/0_0.{extension}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=REQUESTS) as pool:
        results = list(pool.map(daemon.get, paths))
    statuses = [status for status, _, _ in results]
    failures = [
        (path, status, body[:200])
        for path, (status, _, body) in zip(paths, results, strict=True)
        if status != 200
    ]
    assert not failures, failures
    assert all(status < 500 for status in statuses)
    assert daemon.alive()
    listing = daemon.get_json("/slides")["slides"]
    assert len(listing) == len(names)
    unavailable = [slide for slide in listing if not slide["available"]]
    assert not unavailable, json.dumps(unavailable)
