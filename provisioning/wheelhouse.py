"""Wheelhouse of tiled and its dependencies, built on the controller."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_wheelhouse(target: Path, source: str | Path | None = None) -> Path:
    """Build wheels of ``source`` and all its dependencies into ``target``.

    ``source`` is a project folder or a built wheel, by default this repository.
    Nodes install from the result with ``pip --no-index``, so it must hold every
    dependency as a wheel for the nodes' Python and platform. The controller's
    own interpreter builds it, which fits Debian 12 nodes when the controller
    runs Python 3.11 on the same architecture.
    """
    source = Path(source) if source else REPO_ROOT
    target.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--wheel-dir",
        str(target),
        str(source),
    ]
    log.info("building the wheelhouse: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip wheel failed with exit code {result.returncode}:\n{result.stderr}"
        )
    wheels = sorted(target.glob("*.whl"))
    if not any(wheel.name.startswith("tiled_wsi-") for wheel in wheels):
        raise RuntimeError(f"pip wheel left no tiled_wsi wheel in {target}")
    return target
