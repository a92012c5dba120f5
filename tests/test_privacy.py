"""Patient data stays out of HTTP responses.

Synthetic slides carry fake identifying text in every place formats put it:
Aperio ImageDescription fields, label and macro images, DICOM patient and
study attributes. The daemon must show none of it, withhold label and macro
images unless configured, and ``tiled info`` must list what it withholds.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tiled.slides import slide_id_for
from tiled.synthetic import write_slide

# Fake identifiers written into the synthetic files.
APERIO_SECRETS = ["DOE^JANE", "1970-01-01", "jdoe", "Jane Doe", "12/04/26"]
DICOM_SECRETS = [
    "DOE",
    "MRN0012345",
    "19700101",
    "ACC998877",
    "STUDY42",
    "HOUSE",
    "Princeton",
    "BARCODE-7731",
    "20260102",
    "Biopsy",
]


@pytest.fixture
def private_root(tmp_path):
    root = tmp_path / "slides"
    (root / "clinical").mkdir(parents=True)
    (root / "teaching").mkdir()
    for folder in ("clinical", "teaching"):
        write_slide(
            root / folder / "case.svs",
            700,
            600,
            aperio=True,
            label_text="DOE^JANE\nMRN 0012345\n1970-01-01",
        )
    pytest.importorskip("wsidicom")
    from tests.test_formats import write_dicom

    write_dicom(root / "clinical" / "case.dcm")
    return root


def test_slide_metadata_has_no_patient_text(private_root, make_daemon):
    daemon = make_daemon([private_root])
    status, _, body = daemon.get("/slides")
    assert status == 200
    text = body.decode()
    for relative in ("clinical/case.svs", "clinical/case.dcm"):
        status, _, body = daemon.get(f"/slides/{slide_id_for(relative)}")
        assert status == 200, body
        text += body.decode()
    for secret in APERIO_SECRETS + DICOM_SECRETS:
        assert secret not in text, secret
    assert str(private_root) not in text
    info = json.loads(body)
    assert "dicom.PatientName" not in info["properties"]
    assert info["properties"]["dicom.Modality"] == "SM"


def test_label_and_macro_withheld_by_default(private_root, make_daemon):
    daemon = make_daemon([private_root])
    slide_id = slide_id_for("clinical/case.svs")
    info = daemon.get_json(f"/slides/{slide_id}")
    assert info["associated"]["label"]["served"] is False
    assert info["associated"]["macro"]["served"] is False
    assert info["associated"]["thumbnail"]["served"] is True
    for name in ("label", "macro"):
        for extension in ("jpeg", "png"):
            status, headers, body = daemon.get(
                f"/slides/{slide_id}/associated/{name}.{extension}"
            )
            assert status == 403, body
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["error"] == "forbidden"
    status, headers, body = daemon.get(f"/slides/{slide_id}/associated/thumbnail.png")
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(body)).size == (21, 18)
    status, _, body = daemon.get(f"/slides/{slide_id}/associated/map.png")
    assert status == 404
    assert json.loads(body)["error"] == "not_found"


def test_label_served_in_configured_folder(private_root, make_daemon):
    daemon = make_daemon(
        [private_root],
        extra_config={
            "slides": {"associated_image_folders": [str(private_root / "teaching")]}
        },
    )
    teaching = slide_id_for("teaching/case.svs")
    clinical = slide_id_for("clinical/case.svs")
    status, headers, body = daemon.get(f"/slides/{teaching}/associated/label.jpeg")
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(body)).size == (400, 300)
    status, _, _ = daemon.get(f"/slides/{clinical}/associated/label.jpeg")
    assert status == 403


def test_dicom_label_withheld(tmp_path, make_daemon):
    pytest.importorskip("wsidicom")
    import pydicom

    from tests.test_formats import write_dicom

    first = write_dicom(tmp_path / "a.dcm")
    label = pydicom.dcmread(first)
    label.SOPInstanceUID = pydicom.uid.generate_uid()
    label.file_meta.MediaStorageSOPInstanceUID = label.SOPInstanceUID
    label.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    label.save_as(tmp_path / "b.dcm", enforce_file_format=True)
    daemon = make_daemon([tmp_path])
    slide_id = slide_id_for("a.dcm")
    info = daemon.get_json(f"/slides/{slide_id}")
    assert info["associated"]["label"]["served"] is False
    status, _, _ = daemon.get(f"/slides/{slide_id}/associated/label.png")
    assert status == 403


def test_file_names_hidden_when_configured(private_root, make_daemon):
    daemon = make_daemon(
        [private_root], extra_config={"slides": {"show_file_names": False}}
    )
    for slide in daemon.get_json("/slides")["slides"]:
        assert slide["name"] == slide["id"]
        assert "case" not in json.dumps(slide)


def test_info_marks_withheld_fields(private_root, capsys):
    from tiled.cli import main

    path = private_root / "clinical" / "case.svs"
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("aperio.Filename", "aperio.User", "aperio.Title", "aperio.Date"):
        assert key in info["withheld_properties"]
        assert key not in info["properties"]
    assert info["associated_images"]["label"]["served"] is False
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "aperio.Filename = [withheld]" in text
    assert "DOE" not in text


def test_info_lists_dicom_patient_fields_as_withheld(private_root, capsys):
    from tiled.cli import main

    assert main(["info", "--json", str(private_root / "clinical" / "case.dcm")]) == 0
    info = json.loads(capsys.readouterr().out)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "InstitutionName",
        "StudyDate",
        "SeriesDescription",
        "ContainerIdentifier",
    ):
        assert f"dicom.{keyword}" in info["withheld_properties"]
    assert "DOE" not in json.dumps(info["properties"])
