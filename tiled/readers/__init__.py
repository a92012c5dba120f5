"""Slide readers and format detection.

``open_slide`` tries each registered reader in turn; the first whose
constructor succeeds wins. Detection looks at the content, not the name.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tiled.errors import CorruptSlide, TiledError, UnsupportedSlide
from tiled.readers.base import Level, SlideReader, SourceIdentity
from tiled.readers.dicom import DicomReader
from tiled.readers.ome import OmeTiffReader
from tiled.readers.openslide import OpenSlideReader
from tiled.readers.tiff import TiffReader

__all__ = [
    "Level",
    "SlideReader",
    "SourceIdentity",
    "open_slide",
    "READERS",
    "SLIDE_SUFFIXES",
]

#: Readers tried in order. Later formats register themselves here.
READERS: list[Callable[[str], SlideReader]] = [
    DicomReader,
    OmeTiffReader,
    TiffReader,
    OpenSlideReader,
]

#: File name suffixes the slide-root scan considers (lower case).
SLIDE_SUFFIXES = {
    ".svs",
    ".tif",
    ".tiff",
    ".btf",
    ".tf8",
    ".ndpi",
    ".dcm",
    ".dicom",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".svslide",
    ".vmu",
}


def open_slide(path: str | os.PathLike[str]) -> SlideReader:
    """Open a slide with the first reader that accepts its content.

    Raises UnsupportedSlide when no reader accepts the file and CorruptSlide
    when one recognises it but cannot read it. Messages hold no path.
    """
    path = os.fspath(path)
    reasons = []
    for reader in READERS:
        try:
            return reader(path)
        except CorruptSlide:
            raise
        except TiledError as error:
            if getattr(error, "recognised", False):
                raise
            if str(error) not in reasons:
                reasons.append(str(error))
        except OSError as error:
            raise UnsupportedSlide(f"cannot read the file: {error.strerror}") from None
    reason = "; ".join(reasons) or "no reader is registered"
    raise UnsupportedSlide(f"no reader accepts this file ({reason})")
