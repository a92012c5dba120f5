"""Filter that picks the version of a project to install from a wheelhouse."""

from __future__ import annotations

import os
from typing import Any

from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)


def tiled_wheel_versions(paths: list[str], project: str) -> list[str]:
    """Return the versions of ``project`` among wheel ``paths``, oldest first.

    Versions are ordered by PEP 440, so 0.2.0rc1 comes before 0.2.0.
    """
    wanted = canonicalize_name(project)
    versions = set()
    for path in paths:
        try:
            name, version, _, _ = parse_wheel_filename(os.path.basename(path))
        except InvalidWheelFilename:
            continue
        if name == wanted:
            versions.add(version)
    return [str(version) for version in sorted(versions)]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"tiled_wheel_versions": tiled_wheel_versions}
