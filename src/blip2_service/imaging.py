"""Bytes in, a validated RGB image and its sha256 out. Pure: no I/O, no globals.

Limits are checked in the cheapest order (byte length, then the header's
pixel count, then the full decode) so a decompression bomb is refused before
it costs memory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from .domain import TooLarge, Undecodable, Unsupported

# The formats BLIP/BLIP-2 users send; MPO is what many cameras call their JPEGs; HEIF (an
# iPhone's HEIC photos) needs the optional pillow-heif package (the `heif` extra).
SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "HEIF"})
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".mpo"}
    | {".avif", ".heic", ".heif", ".hif"}
)
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF, AVIF or HEIC"
# The brands of an ISO-BMFF `ftyp` box that say HEIF/HEIC (AVIF's own are Pillow's).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})


# Their names here; the kinds (and statuses) are the domain's.
ImageTooLarge = TooLarge
UnsupportedImage = Unsupported
UndecodableImage = Undecodable


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """`image` is 8-bit RGB in the colour space its file declared: it carries that space's ICC
    profile in `info` when it is not sRGB, and `to_srgb` converts what is made from it (a
    resized copy: converting 12 MP costs ~340 ms of a core, a 224x224 copy under 2 ms)."""

    image: Image.Image
    sha256: str
    width: int
    height: int
    format: str
    byte_size: int


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_size(byte_size: int, max_file_size: int) -> None:
    if byte_size > max_file_size:
        raise ImageTooLarge(
            f"Image is {byte_size} bytes, over the limit of {max_file_size} bytes (MAX_FILE_SIZE); "
            "send a smaller or recompressed image"
        )


def check_bytes(data: bytes, max_file_size: int) -> None:
    """The checks that need no decoding: empty (415) or over MAX_FILE_SIZE (413)."""
    if not data:
        raise UnsupportedImage("The image is empty (0 bytes); send the image file's contents")
    check_size(len(data), max_file_size)


@functools.cache
def heif_support() -> bool:
    """Whether HEIC/HEIF can be read: pillow-heif's opener registered with Pillow, once per process.

    Optional because its wheel bundles libheif, libde265 and the GPL-licensed x265, and because
    each decoder is more code reading untrusted bytes: an operator opts in with the `heif` extra.
    """
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def decode_image(data: bytes, *, max_file_size: int, max_image_pixels: int, sha256: str | None = None) -> DecodedImage:
    """Validate and decode; raise ImageTooLarge (413), UnsupportedImage (415) or UndecodableImage (422).

    `sha256`: the bytes' digest when the caller has it already (it looked the image up first).
    """
    check_bytes(data, max_file_size)
    digest = sha256 or sha256_of(data)
    heif = heif_support()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not heif and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            raise UnsupportedImage(
                "HEIC/HEIF images need the optional pillow-heif package, not installed here: "
                "pip install pillow-heif (the heif extra), or send the image as JPEG"
            ) from None
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            raise UnsupportedImage(
                "This TIFF cannot be read (damaged, or a layout such as floating-point colour?); "
                "save it as 8- or 16-bit RGB"
            ) from None
        raise UnsupportedImage(
            f"Not a supported image: send {FORMAT_NAMES} (the first bytes were {data[:8]!r})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"Image has too many pixels: {exc}") from None
    except Exception as exc:  # Pillow raises many types for truncated headers
        raise UndecodableImage(f"The image header cannot be read: {exc}") from None

    fmt = (opened.format or "").upper()
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImage(f"Unsupported image format {fmt or 'unknown'}: send {FORMAT_NAMES}")
    width, height = opened.size
    if width * height > max_image_pixels:
        raise ImageTooLarge(
            f"Image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_image_pixels} (MAX_IMAGE_PIXELS); send a smaller image"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened.seek(0)  # first frame of a GIF / multi-page TIFF
            opened.load()
            # In place: without it Pillow returns a full copy even when there is nothing to turn.
            ImageOps.exif_transpose(opened, in_place=True)
            rgb = to_rgb(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"Image has too many pixels: {exc}") from None
    except Exception as exc:
        raise UndecodableImage(f"The {fmt} image cannot be decoded (truncated or corrupt?): {exc}") from None
    return DecodedImage(rgb, digest, rgb.width, rgb.height, fmt, len(data))


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white and bring every mode (CMYK, 16-bit, palette) to 8-bit RGB.

    The result's `info` holds its ICC profile only where `to_srgb` has something to convert: an
    RGB profile other than sRGB. A CMYK image with its profile is converted here, at full size
    (Pillow's own CMYK conversion ignores the profile: press CMYK came out garish).
    """
    profile = image.info.get("icc_profile") or None
    if image.mode == "CMYK" and profile and (cmyk := _srgb_transform(profile, "CMYK")) is not None:
        return _converted(image, cmyk)
    # Only a profile for the pixels the file holds: an RGB profile on greyscale is a mislabel,
    # and greyscale profiles (a gamma of their own) are left unread.
    rgb_pixels = image.mode in ("RGB", "RGBA", "RGBa", "P")
    rgb = _flat_rgb(image)
    keep = profile if rgb_pixels and profile and _srgb_transform(profile, "RGB") else None
    rgb.info.clear()  # only the profile is wanted downstream
    if keep:
        rgb.info["icc_profile"] = keep
    return rgb


def _flat_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _DEEP_GREY:
        image = _deep_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def to_srgb(image: Image.Image) -> Image.Image:
    """`image` in sRGB, the space the model was trained in and browsers assume for an untagged
    JPEG: converted through the ICC profile `to_rgb` left in its `info` (a wide-gamut iPhone or
    Adobe RGB photo otherwise looks washed out, to the model and in its thumbnail), else itself.

    Returns a new image when it converts: `image` may be the decoded image other threads read.
    """
    profile = image.info.get("icc_profile")
    transform = _srgb_transform(profile, image.mode) if profile else None
    if transform is None:
        return image
    return _converted(image, transform)


def _converted(image: Image.Image, transform: ImageCms.ImageCmsTransform) -> Image.Image:
    out = ImageCms.applyTransform(image, transform)
    assert out is not None  # not in place
    out.info.clear()  # Pillow tags it with the output profile; untagged means sRGB here
    return out


@functools.lru_cache(maxsize=16)
def _srgb_transform(profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from this profile to sRGB, built once per profile (~5 ms); None where there
    is nothing to convert (sRGB already), or nothing to trust (an unreadable profile, or one for
    another colour space than the pixels'): the pixels are used as they are, as browsers do.

    lcms2 transforms may be applied from many threads at once; applying one releases the GIL.
    """
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        if mode not in ("RGB", "CMYK") or source.profile.xcolor_space.strip() != mode:
            return None
        if mode == "RGB" and "srgb" in (source.profile.profile_description or "").lower():
            return None
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except (OSError, ValueError, ImageCms.PyCMSError):
        return None


# 16-bit (either byte order), 32-bit integer and 32-bit float greyscale: TIFF, PNG and scanners.
_DEEP_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def _deep_to_l(image: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits as 8-bit "L", its real range scaled into 0-255.

    Pillow's own conversion clips (a 16-bit scan comes out white, a float image in 0-1 black)
    and has no conversion at all from big-endian 16-bit (the "Macintosh" byte order of TIFFs),
    which it reported as a corrupt image. NaN counts as the darkest value, infinities as the ends.
    """
    values = np.array(image, dtype=np.float32)  # a copy: Pillow's own buffer is read-only
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    values -= low
    values *= 255.0 / (high - low) if high > low else 1.0
    np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(values, 0.0, 255.0, out=values)
    return Image.fromarray(np.rint(values).astype(np.uint8), "L")


def make_thumbnail(image: Image.Image, size: int = 256) -> bytes:
    """A small JPEG for the web page; stored once per image so the page never reads originals.

    Encoded into an in-memory file rather than a BytesIO: Pillow's encoder releases the GIL only
    when it writes to a file descriptor, and into a BytesIO it held it for the whole encode
    (0.28 of 0.4 ms of GIL per thumbnail, bench/gil_cost.py), time the inference thread waits.
    """
    fitted = _fit(image.width, image.height, size)
    # Pillow's `thumbnail` resizes a copy of the whole image in place (36 MB for a 12 MP photo,
    # copied holding the GIL); the same resize into a new image gives the same pixels.
    thumb = image.resize(fitted, Image.Resampling.BICUBIC, reducing_gap=2.0) if fitted else image
    thumb = to_srgb(thumb)  # a browser takes an untagged JPEG for sRGB
    with _memory_file() as out:
        thumb.save(out, format="JPEG", quality=80)
        out.seek(0)
        return out.read()


def _fit(width: int, height: int, size: int) -> tuple[int, int] | None:
    """The size Pillow's `thumbnail((size, size))` picks (aspect kept, rounded its way), or None
    when the image already fits."""
    if size >= width and size >= height:
        return None
    aspect = width / height

    def nearest(number: float, key: Callable[[int], float]) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)

    if aspect <= 1:  # portrait or square: the height is `size`
        return nearest(size * aspect, lambda n: abs(aspect - n / size)), size
    return size, nearest(size / aspect, lambda n: 0 if n == 0 else abs(aspect - size / n))


def _memory_file() -> IO[bytes]:
    """A file with a descriptor that never touches a disk (a memfd), or a temporary file off Linux."""
    if hasattr(os, "memfd_create"):
        try:
            return open(os.memfd_create("thumbnail", os.MFD_CLOEXEC), "w+b")
        except OSError:  # a sandbox that refuses the call (seccomp): a temporary file does the same
            pass
    return tempfile.TemporaryFile()
