"""Reader of DICOM VL Whole Slide Microscopy series, through wsidicom.

A DICOM slide is a series of instances, often one file per level, plus
label, overview and thumbnail instances. The reader is given one file; it
opens every DICOM file in the same folder that shares its
SeriesInstanceUID. wsidicom assembles the pyramid, resolves TILED_FULL and
TILED_SPARSE frame positions (absent frames come back as background),
concatenations, optical paths and focal planes, and decodes JPEG, JPEG 2000,
JPEG-LS, RLE and native transfer syntaxes. Baseline JPEG frames are passed
through where the level's grid matches the DeepZoom grid.

Instances that wsidicom cannot place in a pyramid (such as a volume
instance without ImageType) are read with pydicom as a single level.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping

import numpy as np

try:
    import pydicom
    from pydicom.errors import InvalidDicomError
except ImportError:  # DICOM support is optional: pydicom and wsidicom
    pydicom = None
    InvalidDicomError = ValueError

from tiled.codecs import Codec, Tile, jpeg_with_tables, pack_raw
from tiled.errors import CorruptSlide, UnsupportedSlide
from tiled.readers.base import Level, SlideReader, recognised

log = logging.getLogger("tiled.readers")

VL_WHOLE_SLIDE = "1.2.840.10008.5.1.4.1.1.77.1.6"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# Data elements shown to clients: geometry, pixel encoding and equipment
# model. Every other element with a value is withheld, among them
# PatientName, PatientID, PatientBirthDate, AccessionNumber, StudyID,
# ReferringPhysicianName, InstitutionName, ContainerIdentifier (the slide
# barcode), all dates, times, descriptions and UIDs.
DICOM_ALLOWED = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "ImageType",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "TotalPixelMatrixColumns",
    "TotalPixelMatrixRows",
    "Columns",
    "Rows",
    "NumberOfFrames",
    "DimensionOrganizationType",
    "ImagedVolumeWidth",
    "ImagedVolumeHeight",
    "NumberOfOpticalPaths",
    "TotalPixelMatrixFocalPlanes",
    "LossyImageCompression",
)


def is_dicom_file(path: str) -> bool:
    """Return True if a file has the DICOM Part 10 preamble ("DICM" at 128)."""
    try:
        with open(path, "rb") as file:
            header = file.read(132)
    except OSError:
        return False
    return len(header) == 132 and header[128:132] == b"DICM"


def read_header(path: str) -> pydicom.Dataset:
    """Read a DICOM file's data elements without its pixel data."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as error:
        raise CorruptSlide(f"invalid DICOM header: {error}") from None


def image_flavour(dataset: pydicom.Dataset) -> str:
    """Return the third ImageType value (VOLUME, LABEL, ...) or ""."""
    image_type = dataset.get("ImageType")
    if image_type is None or len(image_type) < 3:
        return ""
    return str(image_type[2]).upper()


def series_files(path: str, series_uid: str) -> list[str]:
    """Return the DICOM files in ``path``'s folder that share its series."""
    folder = os.path.dirname(os.path.abspath(path))
    members = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        candidate = os.path.join(folder, name)
        if not os.path.isfile(candidate) or not is_dicom_file(candidate):
            continue
        try:
            dataset = pydicom.dcmread(
                candidate, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
        except (InvalidDicomError, ValueError, EOFError, OSError):
            continue
        if str(dataset.get("SeriesInstanceUID", "")) == series_uid:
            members.append(candidate)
    return members


class DicomReader(SlideReader):
    """DICOM WSI series: levels, sparse tiles, optical paths and focal planes."""

    format = "dicom"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        if not is_dicom_file(self.path):
            raise UnsupportedSlide("not a DICOM file")
        if pydicom is None:
            raise recognised(
                UnsupportedSlide(
                    "reading DICOM needs pydicom and wsidicom; install them with "
                    "pip install pydicom wsidicom"
                )
            )
        header = read_header(self.path)
        if str(header.get("SOPClassUID", "")) != VL_WHOLE_SLIDE:
            raise recognised(
                UnsupportedSlide(
                    "DICOM object is not a VL Whole Slide Microscopy image"
                )
            )
        self._header = header
        self._lock = threading.Lock()
        self._wsi = None
        self._single: SingleInstance | None = None
        self._thumbnail_path: str | None = None
        files = series_files(self.path, str(header.get("SeriesInstanceUID", "")))
        self.files = files or [self.path]
        headers = {file: read_header(file) for file in self.files}
        self._thumbnail_path = next(
            (f for f, h in headers.items() if image_flavour(h) == "THUMBNAIL"), None
        )
        # Properties describe the largest volume instance, whichever file of
        # the series the catalog handed over.
        volumes = [h for h in headers.values() if image_flavour(h) == "VOLUME"]
        if volumes:
            self._header = max(
                volumes, key=lambda h: int(h.get("TotalPixelMatrixColumns", 0))
            )
        self._open_pyramid()
        self._window = self._display_window() if self.bits == 16 else None

    def _open_pyramid(self) -> None:
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomError, WsiDicomNotFoundError

        try:
            self._wsi = WsiDicom.open(self.files)
        except (WsiDicomError, WsiDicomNotFoundError) as error:
            self._wsi = None
            log.info("wsidicom found no pyramid (%s); reading one instance", error)
        except Exception as error:  # wsidicom raises many types on bad files
            raise CorruptSlide(f"DICOM series cannot be opened: {error}") from None
        if self._wsi is None:
            self._single = SingleInstance(self.path, self._header)
            self.levels = [self._single.level]
            self.samples = self._single.samples
            self.bits = self._single.bits
            self.mpp = self._single.mpp
            self.passthrough_codec = "jpeg" if self._single.jpeg else None
            self.lossy = self._single.jpeg
            return
        wsi = self._wsi
        base = wsi.levels[0]
        self.levels = []
        self._level_numbers = []
        for level in wsi.levels:
            self.levels.append(
                Level(
                    level.size.width,
                    level.size.height,
                    level.tile_size.width,
                    level.tile_size.height,
                    base.size.width / level.size.width,
                )
            )
            self._level_numbers.append(level.level)
        instance = base.default_instance
        dataset = instance.dataset
        self.samples = int(dataset.samples_per_pixel)
        self.bits = 16 if int(dataset.bits) > 8 else 8
        self.optical_paths = sorted(base.optical_paths)
        self.focal_planes = sorted(base.focal_planes)
        self.path_id = self.optical_paths[0] if self.optical_paths else None
        self.focal_plane = (
            instance.default_z
            if instance.default_z in self.focal_planes
            else (self.focal_planes[0] if self.focal_planes else None)
        )
        mpp = base.mpp
        self.mpp = (float(mpp.width), float(mpp.height)) if mpp else None
        syntaxes = {
            str(level.default_instance.image_data.transfer_syntax)
            for level in wsi.levels
        }
        self._jpeg = syntaxes == {JPEG_BASELINE} and self.bits == 8
        self._photometric = str(instance.image_data.photometric_interpretation)
        self.passthrough_codec = "jpeg" if self._jpeg else None
        self.lossy = self._jpeg or any(
            bool(level.default_instance.image_data.lossy_compression)
            for level in wsi.levels
        )

    def _display_window(self) -> tuple[float, float]:
        """Choose the display window of 16-bit samples from the coarsest level.

        The 0.1 and 99.9 percentiles of its top-left 1024x1024 pixels set
        the window, so 12-bit and other narrow data are not shown near black.
        """
        level = len(self.levels) - 1
        info = self.levels[level]
        try:
            pixels = self.read_region(
                level, 0, 0, min(info.width, 1024), min(info.height, 1024)
            )
        except CorruptSlide:
            return 0.0, 65535.0
        low, high = np.percentile(pixels, (0.1, 99.9))
        if high <= low:
            high = low + 1
        return float(low), float(high)

    def to_display(self, pixels: np.ndarray) -> np.ndarray:
        if self._window is None:
            return super().to_display(pixels)
        low, high = self._window
        scaled = (pixels.astype(np.float32) - low) * (255.0 / (high - low))
        return super().to_display(np.clip(scaled, 0, 255).astype(np.uint8))

    @property
    def associated_images(self) -> Mapping[str, tuple[int, int]]:
        sizes: dict[str, tuple[int, int]] = {}
        wsi = self._wsi
        if wsi is not None:
            if wsi.labels:
                size = wsi.labels[0].size
                sizes["label"] = (size.width, size.height)
            if wsi.overviews:
                size = wsi.overviews[0].size
                sizes["macro"] = (size.width, size.height)
        if self._thumbnail_path is not None:
            header = read_header(self._thumbnail_path)
            width = int(header.get("TotalPixelMatrixColumns", header.Columns))
            height = int(header.get("TotalPixelMatrixRows", header.Rows))
            sizes["thumbnail"] = (width, height)
        return sizes

    def read_associated(self, name: str) -> np.ndarray:
        try:
            if name == "thumbnail" and self._thumbnail_path is not None:
                dataset = pydicom.dcmread(self._thumbnail_path)
                pixels = dataset.pixel_array
                if pixels.ndim == 4:
                    pixels = pixels[0]
                return pixels
            wsi = self._wsi
            if name == "label" and wsi is not None and wsi.labels:
                return wsi.read_label(0, as_array=True)
            if name == "macro" and wsi is not None and wsi.overviews:
                return wsi.read_overview(0, as_array=True)
        except (KeyError, IndexError):
            raise
        except Exception as error:  # decoders raise their own exception types
            raise CorruptSlide(
                f"{name} image cannot be decoded: {error}", "decode"
            ) from None
        raise KeyError(name)

    def _check_address(self, level: int, col: int, row: int) -> None:
        info = self.levels[level]
        if not (0 <= col < info.tiles_across and 0 <= row < info.tiles_down):
            raise IndexError(f"tile {col},{row} outside level {level}")

    def read_tile(self, level: int, col: int, row: int) -> Tile | None:
        self._check_address(level, col, row)
        if self._single is not None:
            return self._single.read_tile(col, row)
        info = self.levels[level]
        if self._jpeg:
            try:
                data = self._wsi.read_encoded_tile(
                    self._level_numbers[level],
                    (col, row),
                    z=self.focal_plane,
                    path=self.path_id,
                    crop_to_image_boundary=False,
                )
                # RGB (not YBR) JPEG frames need the Adobe marker for decoders.
                jpeg = jpeg_with_tables(data, None, rgb=self._photometric == "RGB")
            except ValueError as error:
                raise CorruptSlide(
                    f"frame {col},{row} of level {level}: {error}", "invalid_jpeg"
                ) from None
            except Exception as error:  # wsidicom raises many types
                raise CorruptSlide(
                    f"frame {col},{row} of level {level} cannot be read: {error}",
                    "decode",
                ) from None
            return Tile(
                Codec.JPEG, info.tile_width, info.tile_height, jpeg, self.samples, 8
            )
        pixels = self.read_tile_pixels(level, col, row)
        return None if pixels is None else pack_raw(pixels)

    def read_tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        self._check_address(level, col, row)
        if self._single is not None:
            return self._single.read_tile_pixels(col, row)
        info = self.levels[level]
        try:
            pixels = self._wsi.read_tile(
                self._level_numbers[level],
                (col, row),
                z=self.focal_plane,
                path=self.path_id,
                crop_to_image_boundary=False,
                as_array=True,
            )
        except Exception as error:  # decoders raise their own exception types
            raise CorruptSlide(
                f"frame {col},{row} of level {level} cannot be decoded: {error}",
                "decode",
            ) from None
        pixels = np.asarray(pixels)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.shape[2] == 4 and self.samples == 3:
            pixels = pixels[:, :, :3]
        if pixels.shape[:2] != (info.tile_height, info.tile_width):
            padded = np.full(
                (info.tile_height, info.tile_width, pixels.shape[2]),
                np.iinfo(pixels.dtype).max,
                dtype=pixels.dtype,
            )
            height = min(info.tile_height, pixels.shape[0])
            width = min(info.tile_width, pixels.shape[1])
            padded[:height, :width] = pixels[:height, :width]
            pixels = padded
        if self.bits == 16:
            pixels = pixels.astype(np.uint16, copy=False)
        return pixels

    @property
    def properties(self) -> Mapping[str, str]:
        kept = {}
        for keyword in DICOM_ALLOWED:
            value = self._header.get(keyword)
            if value is not None and value != "":
                kept[f"dicom.{keyword}"] = str(value)
        kept["dicom.TransferSyntaxUID"] = str(self._header.file_meta.TransferSyntaxUID)
        if self._wsi is not None:
            kept["dicom.optical_paths"] = ",".join(self.optical_paths)
            kept["dicom.served_optical_path"] = str(self.path_id)
            kept["dicom.focal_planes"] = ",".join(f"{z:g}" for z in self.focal_planes)
            if self.focal_plane is not None:
                kept["dicom.served_focal_plane"] = f"{self.focal_plane:g}"
        kept["dicom.instances"] = str(len(self.files))
        return kept

    @property
    def withheld_properties(self) -> Mapping[str, str]:
        withheld = {}
        for element in self._header:
            keyword = element.keyword
            if not keyword or keyword in DICOM_ALLOWED or keyword == "PixelData":
                continue
            if element.VR == "SQ":
                withheld[f"dicom.{keyword}"] = f"[{len(element.value)} items]"
                continue
            withheld[f"dicom.{keyword}"] = str(element.value)[:200]
        return withheld

    def close(self) -> None:
        wsi = getattr(self, "_wsi", None)
        if wsi is not None:
            wsi.close()
            self._wsi = None


class SingleInstance:
    """One TILED_FULL volume instance read with pydicom, frames in row order.

    NOTE: the whole file is loaded into memory, which suits the small
    instances that reach this path; a pyramid goes through wsidicom.
    """

    def __init__(self, path: str, header: pydicom.Dataset) -> None:
        try:
            self.dataset = pydicom.dcmread(path)
        except (InvalidDicomError, ValueError, EOFError) as error:
            raise CorruptSlide(f"invalid DICOM file: {error}") from None
        dataset = self.dataset
        self.tile_width = int(dataset.Columns)
        self.tile_height = int(dataset.Rows)
        width = int(dataset.get("TotalPixelMatrixColumns", self.tile_width))
        height = int(dataset.get("TotalPixelMatrixRows", self.tile_height))
        self.level = Level(width, height, self.tile_width, self.tile_height, 1.0)
        self.samples = int(dataset.SamplesPerPixel)
        self.bits = 16 if int(dataset.BitsAllocated) > 8 else 8
        self.frames = int(dataset.get("NumberOfFrames", 1))
        self.jpeg = str(dataset.file_meta.TransferSyntaxUID) == JPEG_BASELINE
        self.rgb = str(dataset.PhotometricInterpretation) == "RGB"
        self.mpp = _pixel_spacing_mpp(dataset)
        self._lock = threading.Lock()
        self._encoded: list[bytes] | None = None
        if dataset.get("DimensionOrganizationType", "TILED_FULL") != "TILED_FULL":
            raise recognised(
                UnsupportedSlide("DICOM instance without ImageType must be TILED_FULL")
            )
        expected = self.level.tiles_across * self.level.tiles_down
        if self.frames < expected:
            raise CorruptSlide(
                f"DICOM instance has {self.frames} frames, {expected} expected"
            )

    def _frames(self) -> list[bytes]:
        with self._lock:
            if self._encoded is None:
                from pydicom.encaps import generate_frames

                self._encoded = list(
                    generate_frames(
                        self.dataset.PixelData, number_of_frames=self.frames
                    )
                )
            return self._encoded

    def read_tile(self, col: int, row: int) -> Tile | None:
        if not self.jpeg:
            pixels = self.read_tile_pixels(col, row)
            return None if pixels is None else pack_raw(pixels)
        index = row * self.level.tiles_across + col
        try:
            jpeg = jpeg_with_tables(self._frames()[index], None, rgb=self.rgb)
        except ValueError as error:
            raise CorruptSlide(f"frame {index}: {error}", "invalid_jpeg") from None
        return Tile(
            Codec.JPEG, self.tile_width, self.tile_height, jpeg, self.samples, 8
        )

    def read_tile_pixels(self, col: int, row: int) -> np.ndarray | None:
        index = row * self.level.tiles_across + col
        try:
            if self.jpeg:
                from tiled.codecs import decode_jpeg

                tile = self.read_tile(col, row)
                pixels = decode_jpeg(tile.data)
            else:
                from pydicom.pixels import pixel_array

                with self._lock:
                    pixels = pixel_array(self.dataset, index=index)
        except CorruptSlide:
            raise
        except Exception as error:  # decoders raise their own exception types
            raise CorruptSlide(
                f"frame {index} cannot be decoded: {error}", "decode"
            ) from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return pixels


def _pixel_spacing_mpp(dataset: pydicom.Dataset) -> tuple[float, float] | None:
    """Return microns per pixel from PixelSpacing (row, column spacing in mm)."""
    spacing = None
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            spacing = measures[0].get("PixelSpacing")
    if spacing is None:
        spacing = dataset.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        return None
    row_mm, column_mm = float(spacing[0]), float(spacing[1])
    if row_mm <= 0 or column_mm <= 0 or math.isnan(row_mm + column_mm):
        return None
    return column_mm * 1000.0, row_mm * 1000.0
