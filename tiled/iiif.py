"""IIIF Image API 3.0 at /iiif/3/ and 2.1 at /iiif/2/, compliance level 2.

Image requests are ``{id}/{region}/{size}/{rotation}/{quality}.{format}``.
A request that is exactly one DeepZoom tile (a tile of info.json's grid, at
one of its scale factors, unrotated) is served from the store without
decoding when its codec matches. Others are cut from the pyramid by
tiled.regions under the same pixel limits as the region API.

Rounding: percent regions and sizes derived from one dimension round to the
nearest pixel. A tile at scale factor s spanning w x h level-0 pixels is
ceil(w / s) x ceil(h / s), which matches the DeepZoom level sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any
from urllib.parse import quote

from aiohttp import web
from PIL import Image, ImageOps

from tiled.config import LimitsSettings
from tiled.errors import BadRequest
from tiled.regions import (
    Box,
    deepzoom_tile_bytes,
    encode_image,
    large_output_gate,
    limits_of,
    pyramid_of,
    render,
    service_of,
)
from tiled.slides import SlidePyramid

FORMATS = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
QUALITIES = ("default", "color", "gray", "bitonal")
CONTEXTS = {
    "2": "http://iiif.io/api/image/2/context.json",
    "3": "http://iiif.io/api/image/3/context.json",
}
PROFILES = {
    "2": "http://iiif.io/api/image/2/level2.json",
    "3": "http://iiif.io/api/image/3/level2.json",
}
# Features beyond level 2 (3.0 lists only these in extraFeatures).
EXTRA_FEATURES_3 = [
    "canonicalLinkHeader",
    "mirroring",
    "profileLinkHeader",
    "rotationArbitrary",
    "sizeUpscaling",
]
SUPPORTS_2 = [
    "baseUriRedirect",
    "canonicalLinkHeader",
    "cors",
    "jsonldMediaType",
    "mirroring",
    "profileLinkHeader",
    "regionByPct",
    "regionByPx",
    "regionSquare",
    "rotationArbitrary",
    "rotationBy90s",
    "sizeAboveFull",
    "sizeByConfinedWh",
    "sizeByDistortedWh",
    "sizeByH",
    "sizeByPct",
    "sizeByW",
    "sizeByWh",
]

NUMBER = r"\d+(?:\.\d*)?|\.\d+"
REGION_PIXELS = re.compile(r"(\d+),(\d+),(\d+),(\d+)")
REGION_PERCENT = re.compile(rf"pct:({NUMBER}),({NUMBER}),({NUMBER}),({NUMBER})")
SIZE_WIDTH_HEIGHT = re.compile(r"(!)?(\d+)?,(\d+)?")
SIZE_PERCENT = re.compile(rf"pct:({NUMBER})")
ROTATION = re.compile(rf"(!)?({NUMBER})")
# Digits beyond this in a size are absurd for any image and would only cost
# time in arithmetic.
MAX_DIGITS = 9


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRequest:
    """A parsed image request: level-0 region, output size and the rest."""

    x: int
    y: int
    width: int
    height: int
    out_width: int
    out_height: int
    mirror: bool
    degrees: float
    quality: str
    format: str


def _round(value: float) -> int:
    """Round half up; Python's round() goes to even, which surprises clients."""
    return math.floor(value + 0.5)


def parse_region(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """Return the region as level-0 x, y, width, height, cropped to the image."""
    if text == "full":
        return 0, 0, width, height
    if text == "square":
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, side, side
    match = REGION_PIXELS.fullmatch(text)
    if match and max(len(group) for group in match.groups()) <= MAX_DIGITS:
        x, y, w, h = (int(group) for group in match.groups())
    else:
        match = REGION_PERCENT.fullmatch(text)
        if match is None:
            raise BadRequest(
                f"invalid region {text!r}; use full, square, x,y,w,h or pct:x,y,w,h"
            )
        px, py, pw, ph = (float(group) for group in match.groups())
        if max(px, py, pw, ph) > 1e6:
            raise BadRequest(f"invalid region {text!r}: percentages are too large")
        x, y = _round(px * width / 100), _round(py * height / 100)
        w, h = _round(pw * width / 100), _round(ph * height / 100)
    if w == 0 or h == 0:
        raise BadRequest(f"region {text!r} has zero width or height")
    if x >= width or y >= height:
        raise BadRequest(
            f"region {text!r} lies outside the image of {width}x{height} pixels"
        )
    return x, y, min(w, width - x), min(h, height - y)


def _max_scale(width: int, height: int, limits: LimitsSettings) -> float:
    """Return the largest scale of a region that stays within the limits."""
    return min(
        limits.max_width / width,
        limits.max_height / height,
        math.sqrt(limits.max_area / (width * height)),
    )


def max_size(width: int, height: int, limits: LimitsSettings) -> tuple[int, int]:
    """Return the size 'max' gives a region: its own, or less to fit the limits."""
    scale = _max_scale(width, height, limits)
    if scale >= 1:
        return width, height
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def parse_size(
    text: str, width: int, height: int, version: str, limits: LimitsSettings
) -> tuple[int, int]:
    """Return the output width and height for a region of width x height.

    3.0 enlarges only with a leading '^'; 2.1 always may. Sizes over the
    limits raise BadRequest (400), as do sizes with no pixels.
    """
    upscale = version == "2"
    body = text
    if version == "3" and body.startswith("^"):
        upscale, body = True, body[1:]
    if body == "max" or (version == "2" and body == "full"):
        if upscale and version == "3":
            scale = _max_scale(width, height, limits)
            out = (
                max(1, math.floor(width * scale)),
                max(1, math.floor(height * scale)),
            )
        else:
            out = max_size(width, height, limits)
        return out
    match = SIZE_PERCENT.fullmatch(body)
    if match:
        percent = float(match[1])
        if percent > 1e6:
            raise BadRequest(f"invalid size {text!r}: the percentage is too large")
        out = (_round(width * percent / 100), _round(height * percent / 100))
    else:
        match = SIZE_WIDTH_HEIGHT.fullmatch(body)
        if match is None or (match[2] is None and match[3] is None):
            raise BadRequest(
                f"invalid size {text!r}; use max, w,, ,h, w,h, !w,h or pct:n"
            )
        if any(len(group or "") > MAX_DIGITS for group in match.groups()):
            raise BadRequest(f"invalid size {text!r}: the numbers are too large")
        confined = match[1] is not None
        w = int(match[2]) if match[2] is not None else None
        h = int(match[3]) if match[3] is not None else None
        if confined:
            if w is None or h is None:
                raise BadRequest(f"invalid size {text!r}; !w,h needs both w and h")
            out = fit_size(width, height, w, h)
        elif w is None:
            out = (_round(width * h / height), h)
        elif h is None:
            out = (w, _round(height * w / width))
        else:
            out = (w, h)
    out_width, out_height = out
    if out_width < 1 or out_height < 1:
        raise BadRequest(f"size {text!r} gives an image with no pixels")
    if not upscale and (out_width > width or out_height > height):
        raise BadRequest(
            f"size {text!r} is larger than the {width}x{height} region; "
            "prefix it with ^ to enlarge"
        )
    check_limits(text, out_width, out_height, limits)
    return out_width, out_height


def fit_size(
    width: int, height: int, box_width: int, box_height: int
) -> tuple[int, int]:
    """Return the largest size of width:height aspect within box_width x box_height."""
    if box_width * height <= box_height * width:
        return box_width, min(box_height, _round(height * box_width / width))
    return min(box_width, _round(width * box_height / height)), box_height


def check_limits(text: str, width: int, height: int, limits: LimitsSettings) -> None:
    if width > limits.max_width or height > limits.max_height:
        raise BadRequest(
            f"size {text!r} gives {width}x{height}, over the maximum "
            f"{limits.max_width}x{limits.max_height}"
        )
    if width * height > limits.max_area:
        raise BadRequest(
            f"size {text!r} gives {width * height} pixels, over the maximum area "
            f"of {limits.max_area}"
        )


def parse_rotation(text: str) -> tuple[bool, float]:
    """Return (mirror, clockwise degrees in [0, 360])."""
    match = ROTATION.fullmatch(text)
    if match is None or len(match[2]) > 12:
        raise BadRequest(f"invalid rotation {text!r}; use n or !n with 0 <= n <= 360")
    degrees = float(match[2])
    if degrees > 360:
        raise BadRequest(f"invalid rotation {text!r}; the angle must be 0-360")
    return match[1] is not None, degrees


def parse_quality_format(text: str) -> tuple[str, str]:
    quality, dot, image_format = text.rpartition(".")
    if not dot:
        raise BadRequest(f"{text!r} needs a format, e.g. default.jpg")
    if quality not in QUALITIES:
        raise BadRequest(
            f"invalid quality {quality!r}; use one of {', '.join(QUALITIES)}"
        )
    if image_format not in FORMATS:
        raise BadRequest(
            f"unsupported format {image_format!r}; use one of {', '.join(FORMATS)}"
        )
    return quality, image_format


def _number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def canonical_path(request: ImageRequest, width: int, height: int, version: str) -> str:
    """Return region/size/rotation/quality.format in the canonical form."""
    if (request.x, request.y, request.width, request.height) == (0, 0, width, height):
        region = "full"
    else:
        region = f"{request.x},{request.y},{request.width},{request.height}"
    output = (request.out_width, request.out_height)
    if version == "3":
        size = "max" if output == (request.width, request.height) else "{},{}"
    else:
        size = "full" if output == (request.width, request.height) else "{},"
    size = size.format(*output)
    rotation = ("!" if request.mirror else "") + _number(request.degrees)
    return f"{region}/{size}/{rotation}/{request.quality}.{request.format}"


def service_url(http_request: web.Request, version: str, identifier: str) -> str:
    # NOTE: ids in info.json use the request's Host header and scheme. A proxy
    # in front of tiled must pass Host through, or the ids will not resolve.
    base = f"{http_request.scheme}://{http_request.host}"
    return f"{base}/iiif/{version}/{quote(identifier, safe='')}"


def scale_factors(pyramid: SlidePyramid) -> list[int]:
    return [2**steps for steps in range(pyramid.geometry.level_count)]


def advertised_sizes(pyramid: SlidePyramid, limits: LimitsSettings) -> list[dict]:
    """Return the power-of-two sizes of the whole image within the limits."""
    sizes = []
    for width, height in pyramid.geometry.level_dimensions:
        if (
            width <= limits.max_width
            and height <= limits.max_height
            and width * height <= limits.max_area
        ):
            sizes.append({"width": width, "height": height})
    return sizes


def info_document(
    pyramid: SlidePyramid, url: str, version: str, limits: LimitsSettings
) -> dict[str, Any]:
    width, height = pyramid.geometry.level_dimensions[-1]
    tile_size = pyramid.geometry.tile_size
    tiles = [
        {
            "width": tile_size,
            "height": tile_size,
            "scaleFactors": scale_factors(pyramid),
        }
    ]
    bounds = {
        "maxWidth": limits.max_width,
        "maxHeight": limits.max_height,
        "maxArea": limits.max_area,
    }
    if version == "3":
        return {
            "@context": CONTEXTS["3"],
            "id": url,
            "type": "ImageService3",
            "protocol": "http://iiif.io/api/image",
            "profile": "level2",
            "width": width,
            "height": height,
            **bounds,
            "sizes": advertised_sizes(pyramid, limits),
            "tiles": tiles,
            "extraQualities": ["color", "gray", "bitonal"],
            "extraFormats": ["webp"],
            "extraFeatures": EXTRA_FEATURES_3,
        }
    return {
        "@context": CONTEXTS["2"],
        "@id": url,
        "protocol": "http://iiif.io/api/image",
        "width": width,
        "height": height,
        "sizes": advertised_sizes(pyramid, limits),
        "tiles": tiles,
        "profile": [
            PROFILES["2"],
            {
                "formats": list(FORMATS),
                "qualities": list(QUALITIES),
                "supports": SUPPORTS_2,
                **bounds,
            },
        ],
    }


async def get_info(request: web.Request) -> web.Response:
    from tiled.server import json_response

    version = request.match_info["version"]
    identifier = request.match_info["identifier"]
    pyramid = await pyramid_of(request, identifier)
    url = service_url(request, version, identifier)
    document = info_document(pyramid, url, version, limits_of(request))
    response = json_response(document, headers={"Cache-Control": "public, max-age=300"})
    if "application/ld+json" in request.headers.get("Accept", ""):
        response.content_type = "application/ld+json"
        response.headers["Content-Type"] = (
            f'application/ld+json;profile="{CONTEXTS[version]}"'
        )
    response.headers["Link"] = f'<{PROFILES[version]}>;rel="profile"'
    return response


async def redirect_to_info(request: web.Request) -> web.Response:
    version = request.match_info["version"]
    identifier = request.match_info["identifier"]
    location = f"/iiif/{version}/{quote(identifier, safe='')}/info.json"
    return web.Response(status=303, headers={"Location": location})


def tile_address(
    pyramid: SlidePyramid, image_request: ImageRequest
) -> tuple[int, int, int] | None:
    """Return (z, col, row) if the request is exactly one DeepZoom tile."""
    geometry = pyramid.geometry
    if geometry.overlap:
        return None
    width, height = geometry.level_dimensions[-1]
    size = geometry.tile_size
    for steps in range(geometry.level_count):
        factor = 2**steps
        span = size * factor
        if image_request.x % span or image_request.y % span:
            continue
        if image_request.width != min(span, width - image_request.x):
            continue
        if image_request.height != min(span, height - image_request.y):
            continue
        expected = (
            math.ceil(image_request.width / factor),
            math.ceil(image_request.height / factor),
        )
        if (image_request.out_width, image_request.out_height) != expected:
            continue
        z = geometry.level_count - 1 - steps
        return z, image_request.x // span, image_request.y // span
    return None


def transform(image: Image.Image, image_request: ImageRequest) -> Image.Image:
    """Mirror, rotate clockwise and apply the quality, in that order."""
    if image_request.mirror:
        image = ImageOps.mirror(image)
    degrees = image_request.degrees % 360
    if degrees in (90, 180, 270):
        transpose = {
            90: Image.Transpose.ROTATE_270,
            180: Image.Transpose.ROTATE_180,
            270: Image.Transpose.ROTATE_90,
        }[int(degrees)]
        image = image.transpose(transpose)
    elif degrees:
        # Corners left empty are white in JPEG and transparent where the format
        # has alpha.
        if image_request.format == "jpg":
            fill: tuple[int, ...] = (255, 255, 255)
        else:
            image = image.convert("RGBA")
            fill = (255, 255, 255, 0)
        image = image.rotate(
            -degrees, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=fill
        )
    if image_request.quality == "gray":
        image = image.convert("LA" if image.mode == "RGBA" else "L")
    elif image_request.quality == "bitonal":
        if image.mode == "RGBA":
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.getchannel("A"))
            image = background
        image = image.convert("L").point(lambda value: 255 if value >= 128 else 0)
        image = image.convert("1")
    return image


def _render_transformed(
    pixels: Any, image_request: ImageRequest, quality: int
) -> bytes:
    image = transform(Image.fromarray(pixels), image_request)
    image_format = "jpeg" if image_request.format == "jpg" else image_request.format
    return encode_image(image, image_format, quality)


async def get_image(request: web.Request) -> web.StreamResponse:
    from tiled.server import SETTINGS, etag_for, not_modified

    version = request.match_info["version"]
    identifier = request.match_info["identifier"]
    mirror, degrees = parse_rotation(request.match_info["rotation"])
    quality, image_format = parse_quality_format(request.match_info["quality_format"])
    limits = limits_of(request)
    pyramid = await pyramid_of(request, identifier)
    width, height = pyramid.geometry.level_dimensions[-1]
    x, y, w, h = parse_region(request.match_info["region"], width, height)
    out_width, out_height = parse_size(
        request.match_info["size"], w, h, version, limits
    )
    image_request = ImageRequest(
        x, y, w, h, out_width, out_height, mirror, degrees, quality, image_format
    )
    canonical = canonical_path(image_request, width, height, version)
    url = service_url(request, version, identifier)
    max_age = request.app[SETTINGS].server.tile_max_age_seconds
    etag = etag_for(
        pyramid.entry.id, pyramid.generation, pyramid.variant, version, canonical
    )
    headers = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={max_age}",
        "Link": (
            f'<{PROFILES[version]}>;rel="profile", <{url}/{canonical}>;rel="canonical"'
        ),
    }
    if not_modified(request, etag):
        return web.Response(status=304, headers=headers)
    service = service_of(request)
    address = None
    plain = not mirror and degrees % 360 == 0 and quality in ("default", "color")
    if plain and image_format in ("jpg", "png"):
        address = tile_address(pyramid, image_request)
    if address is not None:
        tile_format = "jpeg" if image_format == "jpg" else "png"
        body = await deepzoom_tile_bytes(service, pyramid, address, tile_format, "iiif")
    else:
        box = Box(x, y, w, h)
        async with large_output_gate(service, out_width * out_height):
            pixels = await render(service, pyramid, box, out_width, out_height, limits)
            body = await service.run(
                _render_transformed, pixels, image_request, pyramid.jpeg_quality
            )
    return web.Response(body=body, content_type=FORMATS[image_format], headers=headers)


def add_routes(app: web.Application) -> None:
    prefix = "/iiif/{version:[23]}/{identifier}"
    app.router.add_get(prefix, redirect_to_info)
    app.router.add_get(prefix + "/info.json", get_info)
    app.router.add_get(
        prefix + "/{region}/{size}/{rotation}/{quality_format}", get_image
    )
