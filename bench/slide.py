"""Build the benchmark slide: a large JPEG pyramidal TIFF of tissue images.

The slide is a grid of cells cut from a source image. Each cell takes a
random offset into the source, a random flip and a small per-band gain, so
neighbouring tiles differ the way tiles of a scanned slide do. The source is
the Aperio sample CMU-1-Small-Region.svs when it is found, or else a
synthetic H&E-like texture (pink stroma, purple nuclei, white glass).

Everything runs through the `vips` command line (libvips 8.14 on Debian 12),
so no Python binding is needed.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.slide")

CELL_WIDTH = 2000
CELL_HEIGHT = 2500
# Distinct cells built from the source; the grid reuses them at random.
POOL_SIZE = 12

SAMPLE_PATTERNS = (
    "aperio-svs/*/CMU-1-Small-Region.svs",
    "**/CMU-1-Small-Region.svs",
    "aperio-svs/**/*.svs",
)


@dataclass
class SlideInfo:
    path: Path
    width: int
    height: int
    source: str


def run_vips(*args: str) -> None:
    command = ["vips", *args]
    log.debug("run %s", " ".join(command))
    subprocess.run(command, check=True)


def read_size(path: Path) -> tuple[int, int]:
    width = subprocess.run(
        ["vipsheader", "-f", "width", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    height = subprocess.run(
        ["vipsheader", "-f", "height", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(width), int(height)


def find_sample(samples_dir: Path) -> Path | None:
    """Return the first real tissue slide under samples_dir, or None."""
    if not samples_dir.is_dir():
        return None
    for pattern in SAMPLE_PATTERNS:
        for path in sorted(samples_dir.glob(pattern)):
            try:
                width, height = read_size(path)
            except subprocess.CalledProcessError:
                continue
            # small.svs is 16x16: too small to cut cells from.
            if width >= CELL_WIDTH and height >= CELL_HEIGHT:
                return path
    return None


def make_synthetic_source(work: Path, seed: int) -> Path:
    """Write a 2400x3000 H&E-like texture to work/synthetic.v and return it."""
    width, height = CELL_WIDTH + 400, CELL_HEIGHT + 500
    noise = work / "noise.v"
    stroma = work / "stroma.v"
    nuclei_noise = work / "nuclei_noise.v"
    nuclei_mask = work / "nuclei_mask.v"
    glass_noise = work / "glass_noise.v"
    glass_mask = work / "glass_mask.v"
    purple = work / "purple.v"
    white = work / "white.v"
    tissue = work / "tissue.v"
    out = work / "synthetic.v"

    # Stroma: blurred noise mapped onto an eosin pink, each band with its own
    # gain so brighter noise goes paler rather than greyer.
    run_vips(
        "gaussnoise",
        str(noise),
        str(width),
        str(height),
        "--sigma",
        "40",
        "--mean",
        "128",
        "--seed",
        str(seed),
    )
    blurred = work / "noise_blur.v"
    run_vips("gaussblur", str(noise), str(blurred), "6")
    three = work / "noise3.v"
    run_vips("bandjoin", f"{blurred} {blurred} {blurred}", str(three))
    run_vips(
        "linear", str(three), str(stroma), "0.25 0.6 0.35", "200 80 150", "--uchar"
    )

    # Nuclei: thresholded blobs of finer noise, filled with haematoxylin purple.
    run_vips(
        "gaussnoise",
        str(nuclei_noise),
        str(width),
        str(height),
        "--sigma",
        "60",
        "--mean",
        "128",
        "--seed",
        str(seed + 1),
    )
    nuclei_blur = work / "nuclei_blur.v"
    run_vips("gaussblur", str(nuclei_noise), str(nuclei_blur), "3")
    run_vips("relational_const", str(nuclei_blur), str(nuclei_mask), "more", "141")
    run_vips("black", str(purple), str(width), str(height), "--bands", "3")
    purple_tinted = work / "purple_tinted.v"
    run_vips("linear", str(purple), str(purple_tinted), "1 1 1", "95 60 140", "--uchar")
    run_vips(
        "ifthenelse", str(nuclei_mask), str(purple_tinted), str(stroma), str(tissue)
    )

    # Glass: large smooth blobs of near-white where there is no tissue.
    run_vips(
        "gaussnoise",
        str(glass_noise),
        str(width),
        str(height),
        "--sigma",
        "90",
        "--mean",
        "128",
        "--seed",
        str(seed + 2),
    )
    glass_blur = work / "glass_blur.v"
    run_vips("gaussblur", str(glass_noise), str(glass_blur), "60")
    run_vips("relational_const", str(glass_blur), str(glass_mask), "more", "131")
    run_vips("black", str(white), str(width), str(height), "--bands", "3")
    white_tinted = work / "white_tinted.v"
    run_vips("linear", str(white), str(white_tinted), "1 1 1", "243 242 245", "--uchar")
    run_vips("ifthenelse", str(glass_mask), str(white_tinted), str(tissue), str(out))
    return out


def make_cell_pool(source: Path, work: Path, seed: int) -> list[Path]:
    """Cut POOL_SIZE jittered, flipped and tinted cells out of source."""
    rng = random.Random(seed)
    source_width, source_height = read_size(source)
    cells = []
    for index in range(POOL_SIZE):
        left = rng.randint(0, source_width - CELL_WIDTH)
        top = rng.randint(0, source_height - CELL_HEIGHT)
        cropped = work / f"crop{index}.v"
        run_vips(
            "crop",
            str(source),
            str(cropped),
            str(left),
            str(top),
            str(CELL_WIDTH),
            str(CELL_HEIGHT),
        )
        flipped = cropped
        for direction in ("horizontal", "vertical"):
            if rng.random() < 0.5:
                target = work / f"crop{index}_{direction}.v"
                run_vips("flip", str(flipped), str(target), direction)
                flipped = target
        gains = " ".join(f"{rng.uniform(0.97, 1.02):.3f}" for _ in range(3))
        cell = work / f"cell{index}.v"
        # Drop any alpha band the loader adds, then tint.
        rgb = work / f"cell{index}_rgb.v"
        run_vips("extract_band", str(flipped), str(rgb), "0", "--n", "3")
        run_vips("linear", str(rgb), str(cell), gains, "0 0 0", "--uchar")
        cells.append(cell)
    return cells


def build_slide(
    out: Path,
    samples_dir: Path,
    width: int = 40000,
    height: int = 30000,
    seed: int = 1,
    quality: int = 80,
) -> SlideInfo:
    """Write the pyramidal TIFF to out unless it is already there."""
    source_note = out.with_suffix(".source")
    if out.exists() and source_note.exists():
        existing_width, existing_height = read_size(out)
        if (existing_width, existing_height) == (width, height):
            log.info("slide %s is cached (%dx%d)", out, width, height)
            return SlideInfo(out, width, height, source_note.read_text().strip())
    if width % CELL_WIDTH or height % CELL_HEIGHT:
        raise ValueError(
            f"slide size {width}x{height} must be a multiple of the "
            f"{CELL_WIDTH}x{CELL_HEIGHT} cell"
        )

    work = out.parent / "slide-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sample = find_sample(samples_dir)
    if sample is not None:
        log.info("building %dx%d slide from tissue in %s", width, height, sample)
        source = work / "source.v"
        run_vips("copy", str(sample), str(source))
        source_name = f"tissue from {sample.name}"
    else:
        log.warning("no tissue sample under %s, using a synthetic texture", samples_dir)
        source = make_synthetic_source(work, seed)
        source_name = "synthetic H&E-like texture"

    cells = make_cell_pool(source, work, seed)
    rng = random.Random(seed + 100)
    across = width // CELL_WIDTH
    down = height // CELL_HEIGHT
    grid = [str(rng.choice(cells)) for _ in range(across * down)]
    partial = out.with_suffix(".partial.tif")
    options = (
        f"[tile,pyramid,compression=jpeg,Q={quality},tile-width=256,tile-height=256]"
    )
    run_vips(
        "arrayjoin", " ".join(grid), f"{partial}{options}", "--across", str(across)
    )
    partial.rename(out)
    source_note.write_text(source_name + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return SlideInfo(out, width, height, source_name)


def build_dzsave_tree(slide: Path, out_dir: Path, quality: int = 80) -> Path:
    """Write a static DeepZoom tree (256 px tiles, no overlap); return its .dzi."""
    dzi = out_dir / "slide.dzi"
    if dzi.exists() and (out_dir / "slide_files").is_dir():
        log.info("DeepZoom tree %s is cached", dzi)
        return dzi
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    log.info("writing DeepZoom tree with vips dzsave to %s", out_dir)
    run_vips(
        "dzsave",
        str(slide),
        str(out_dir / "slide"),
        "--tile-size",
        "256",
        "--overlap",
        "0",
        "--suffix",
        f".jpg[Q={quality}]",
    )
    return dzi
