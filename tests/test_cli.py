"""The tiled command line and its configuration sources."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiled.config import ConfigError, load_settings


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tiled", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_config_sources_in_order(tmp_path):
    config = tmp_path / "tiled.yaml"
    config.write_text("server:\n  port: 9001\n  threads: 3\ndeepzoom:\n  overlap: 1\n")
    settings = load_settings(
        config,
        environ={"TILED_SERVER_PORT": "9002", "TILED_DEEPZOOM_JPEG_QUALITY": "80"},
        overrides={"server": {"port": 9003}},
    )
    assert settings.server.port == 9003
    assert settings.server.threads == 3
    assert settings.deepzoom.overlap == 1
    assert settings.deepzoom.jpeg_quality == 80


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  prot: 1\n", "unknown key server.prot"),
        ("serve:\n  port: 1\n", "unknown section 'serve'"),
        ("server:\n  port: many\n", "server.port: expected int"),
        ("server:\n  port: 70000\n", "server.port must be 1-65535"),
        ("deepzoom:\n  jpeg_quality: 0\n", "jpeg_quality must be 1-100"),
        ("[1, 2]\n", "top level must be a mapping"),
        ("server: [\n", "invalid YAML"),
    ],
)
def test_invalid_config_is_rejected(tmp_path, text, message):
    config = tmp_path / "tiled.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_serve_reports_bad_config(tmp_path):
    config = tmp_path / "tiled.yaml"
    config.write_text("server:\n  port: 0\n")
    result = run("serve", "--config", str(config))
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_reports_missing_folder(tmp_path):
    result = run("serve", str(tmp_path / "absent"), "--store", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_info_marks_withheld_fields(synthetic_root):
    result = run("info", str(synthetic_root / "odd.svs"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["dimensions"] == [4875, 4071]
    assert info["format"] == "aperio"
    assert info["mpp"] == [0.25, 0.25]
    assert "aperio.Filename" in info["withheld_properties"]
    assert "DOE" not in result.stdout
    assert info["associated_images"]["label"]["served"] is False
    assert info["associated_images"]["thumbnail"]["served"] is True
    text = run("info", str(synthetic_root / "odd.svs"))
    assert "aperio.Filename = [withheld]" in text.stdout
    assert "withheld (may show patient data)" in text.stdout


def test_info_rejects_non_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("not a slide")
    result = run("info", str(path))
    assert result.returncode == 1
    assert "no reader accepts this file" in result.stderr
    assert "Traceback" not in result.stderr


def test_ingest_prints_counts(tmp_path, synthetic_root):
    result = run(
        "ingest",
        str(synthetic_root / "lossless.tif"),
        "--store",
        str(tmp_path / "store"),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["made"] == summary["total"] > 0


def test_cors_origins_from_environment():
    environ = {"TILED_SERVER_CORS_ORIGINS": "https://a.example, https://b.example:8443"}
    settings = load_settings(environ=environ)
    assert settings.server.cors_origins == [
        "https://a.example",
        "https://b.example:8443",
    ]
