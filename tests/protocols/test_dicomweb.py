"""DICOMweb: QIDO-RS, WADO-RS metadata and frames, with dicomweb-client and wsidicom."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import JPEG_SIZE, LOSSLESS_SIZE, pattern_pixels
from PIL import Image

from tiled.dicomweb import NotAcceptable, choose_frame_syntax, uid_for

dicomweb_client = pytest.importorskip("dicomweb_client.api")
pydicom = pytest.importorskip("pydicom")

JPEG = "1.2.840.10008.1.2.4.50"
UNCOMPRESSED = "1.2.840.10008.1.2.1"


def value(item: dict, tag: str):
    return item[tag]["Value"][0]


@pytest.fixture(scope="module")
def web_client(live_server):
    return dicomweb_client.DICOMwebClient(f"{live_server.base}/dicomweb")


def find_slide(web_client, width: int) -> tuple[str, str, list[dict]]:
    """Return study UID, series UID and instances of the slide of a given width."""
    for study in web_client.search_for_studies():
        study_uid = value(study, "0020000D")
        series_uid = value(web_client.search_for_series(study_uid)[0], "0020000E")
        instances = web_client.search_for_instances(study_uid, series_uid)
        if any(value(item, "00480006") == width for item in instances):
            return study_uid, series_uid, instances
    raise AssertionError(f"no slide {width} pixels wide")


def test_uids_are_stable_and_valid():
    uid = uid_for("study", "abc")
    assert uid == uid_for("study", "abc")
    assert uid != uid_for("study", "abd")
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", UNCOMPRESSED),
        ('multipart/related; type="image/jpeg"', JPEG),
        (f'multipart/related; type="image/jpeg"; transfer-syntax={JPEG}', JPEG),
        ('multipart/related; type="application/octet-stream"', UNCOMPRESSED),
        ('multipart/related; type="*/*"', UNCOMPRESSED),
        (
            'multipart/related; type="image/jp2", multipart/related; type="image/jpeg"',
            JPEG,
        ),
    ],
)
def test_choose_frame_syntax(accept, expected):
    assert choose_frame_syntax(accept, UNCOMPRESSED) == expected


def test_choose_frame_syntax_rejects_jpeg2000():
    with pytest.raises(NotAcceptable):
        choose_frame_syntax('multipart/related; type="image/jp2"', JPEG)


def test_qido_lists_every_slide(web_client):
    studies = web_client.search_for_studies()
    assert len(studies) == 2
    for study in studies:
        assert value(study, "00080061") == "SM"
        assert "Value" not in study["00100010"]
    study_uid = value(studies[0], "0020000D")
    matched = web_client.search_for_studies(
        search_filters={"StudyInstanceUID": study_uid}
    )
    assert len(matched) == 1
    series = web_client.search_for_series(study_uid, search_filters={"Modality": "SM"})
    assert len(series) == 1
    none = web_client.search_for_series(study_uid, search_filters={"Modality": "CT"})
    assert none == []


def test_instance_metadata(web_client):
    study_uid, series_uid, instances = find_slide(web_client, JPEG_SIZE[0])
    assert len(instances) == 4
    for item in instances:
        assert value(item, "00080016") == "1.2.840.10008.5.1.4.1.1.77.1.6"
        assert JPEG in item["00083002"]["Value"]
    metadata = web_client.retrieve_series_metadata(study_uid, series_uid)
    datasets = sorted(
        (pydicom.Dataset.from_json(item) for item in metadata),
        key=lambda dataset: dataset.InstanceNumber,
    )
    base = datasets[0]
    assert list(base.ImageType)[:3] == ["ORIGINAL", "PRIMARY", "VOLUME"]
    assert list(datasets[1].ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    assert (base.TotalPixelMatrixColumns, base.TotalPixelMatrixRows) == JPEG_SIZE
    assert (base.Columns, base.Rows) == (256, 256)
    assert base.NumberOfFrames == math.ceil(1500 / 256) * math.ceil(1100 / 256)
    assert base.DimensionOrganizationType == "TILED_FULL"
    spacing = base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in spacing.PixelSpacing] == pytest.approx([0.00025, 0.00025])
    assert base.PatientName == ""
    assert base.StudyInstanceUID == study_uid


def test_frames_jpeg_pass_through_and_padding(web_client, live_server):
    study_uid, series_uid, instances = find_slide(web_client, JPEG_SIZE[0])
    level0 = next(item for item in instances if value(item, "00200013") == 1)
    instance_uid = value(level0, "00080018")
    frames = web_client.retrieve_instance_frames(
        study_uid, series_uid, instance_uid, [1, 6], media_types=("image/jpeg",)
    )
    import urllib.request

    with urllib.request.urlopen(
        f"{live_server.base}/slides/tissue_files/11/0_0.jpeg"
    ) as r:
        assert frames[0] == r.read()
    # Frame 6 is the last column: 1500 - 5 * 256 = 220 pixels, padded to 256.
    edge = Image.open(io.BytesIO(frames[1]))
    assert edge.size == (256, 256)
    padding = np.asarray(edge)[:, 230:]
    assert padding.min() > 240


def test_frames_uncompressed(web_client):
    study_uid, series_uid, instances = find_slide(web_client, LOSSLESS_SIZE[0])
    level0 = next(item for item in instances if value(item, "00200013") == 1)
    frames = web_client.retrieve_instance_frames(
        study_uid,
        series_uid,
        value(level0, "00080018"),
        [3],
        media_types=(("application/octet-stream", UNCOMPRESSED),),
    )
    pixels = np.frombuffer(frames[0], np.uint8).reshape(256, 256, 3)
    expected = pattern_pixels(*LOSSLESS_SIZE)[0:256, 512:700]
    assert np.array_equal(pixels[:, :188], expected)
    assert (pixels[:, 188:] == 255).all()


def test_bad_frame_requests(web_client, live_server):
    import urllib.error
    import urllib.request

    study_uid, series_uid, instances = find_slide(web_client, JPEG_SIZE[0])
    instance_uid = value(instances[0], "00080018")
    base = (
        f"{live_server.base}/dicomweb/studies/{study_uid}/series/{series_uid}"
        f"/instances/{instance_uid}/frames"
    )
    cases = [("/0", 404), ("/999", 404), ("/1,x", 400), ("/1", 406)]
    for suffix, status in cases:
        request = urllib.request.Request(base + suffix)
        if status == 406:
            request.add_header("Accept", 'multipart/related; type="image/jp2"')
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request)
        assert error.value.code == status
        assert error.value.headers["Content-Type"].startswith("application/json")


def test_thumbnails_and_rendered(web_client, live_server):
    import urllib.request

    study_uid, series_uid, instances = find_slide(web_client, JPEG_SIZE[0])
    instance_uid = value(instances[0], "00080018")
    series_url = f"{live_server.base}/dicomweb/studies/{study_uid}/series/{series_uid}"
    with urllib.request.urlopen(f"{series_url}/thumbnail?viewport=100,100") as r:
        assert Image.open(io.BytesIO(r.read())).size == (100, 73)
    rendered = f"{series_url}/instances/{instance_uid}/frames/1/rendered"
    request = urllib.request.Request(rendered, headers={"Accept": "image/png"})
    with urllib.request.urlopen(request) as r:
        assert r.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(r.read())).size == (256, 256)


def test_wsidicom_reads_regions(web_client):
    wsidicom = pytest.importorskip("wsidicom")
    study_uid, series_uid, _ = find_slide(web_client, LOSSLESS_SIZE[0])
    client = wsidicom.WsiDicomWebClient(web_client)
    # NOTE: wsidicom 0.36 with dicomweb-client 0.61 fails to decode
    # uncompressed frames (bytearray given to pydicom), so JPEG is requested.
    with wsidicom.WsiDicom.open_web(
        client, study_uid, series_uid, requested_transfer_syntax=JPEG
    ) as slide:
        assert (slide.size.width, slide.size.height) == LOSSLESS_SIZE
        assert slide.mpp.width == pytest.approx(0.5)
        region = np.asarray(slide.read_region((100, 50), 0, (300, 200)))
        expected = pattern_pixels(*LOSSLESS_SIZE)[50:250, 100:400]
        difference = np.abs(region[:, :, :3].astype(int) - expected.astype(int))
        assert difference.mean() < 2.0
        # The blue ramp wraps from 255 to 0, which 4:2:0 chroma smears.
        assert np.percentile(difference, 99) <= 16
        # Level 1 (350 x 250) up to its edge, against a 2x2 average of level 0.
        low = np.asarray(slide.read_region((320, 220), 1, (30, 30)))[:, :, :3]
        level0 = pattern_pixels(*LOSSLESS_SIZE)[440:500, 640:700].astype(int)
        averaged = (
            level0[0::2, 0::2]
            + level0[1::2, 0::2]
            + level0[0::2, 1::2]
            + level0[1::2, 1::2]
        ) / 4
        assert np.abs(low.astype(int) - averaged).mean() < 3.0
