import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from blip2_service.imaging import (
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImage,
    decode_image,
    heif_support,
    make_thumbnail,
    sha256_of,
    to_srgb,
)

from ..icc_profiles import P3_ORANGE, P3_ORANGE_IN_SRGB, cmyk_profile, display_p3

LIMITS = {"max_file_size": 5_000_000, "max_image_pixels": 4_000_000}


def _encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _photo(w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "AVIF", "HEIF"])
def test_every_supported_format_decodes_to_rgb_with_its_hash(fmt: str) -> None:
    assert heif_support()  # the `heif` extra is part of the test install
    data = _encode(_photo(), fmt)
    decoded = decode_image(data, **LIMITS)
    assert decoded.image.mode == "RGB"
    assert (decoded.width, decoded.height) == (40, 30)
    assert decoded.format == fmt
    assert decoded.sha256 == sha256_of(data)
    assert decoded.byte_size == len(data)


def test_format_is_sniffed_from_content_not_trusted_from_names() -> None:
    # PNG bytes whatever the caller calls them; text called .jpg is refused.
    assert decode_image(_encode(_photo(), "PNG"), **LIMITS).format == "PNG"
    with pytest.raises(UnsupportedImage, match="Not a supported image"):
        decode_image(b"GIF89a? no, just text pretending", **LIMITS)


def test_without_the_heif_extra_a_heic_photo_gets_a_line_saying_what_to_install(tmp_path: Path) -> None:
    assert heif_support()
    heic = tmp_path / "photo.heic"
    heic.write_bytes(_encode(_photo(), "HEIF"))
    # A fresh interpreter where pillow_heif cannot be imported: the extra is not installed.
    script = (
        "import sys; sys.modules['pillow_heif'] = None\n"
        "from blip2_service.imaging import decode_image, UnsupportedImage\n"
        f"data = open({str(heic)!r}, 'rb').read()\n"
        "try:\n    decode_image(data, max_file_size=10**7, max_image_pixels=10**7)\n"
        "except UnsupportedImage as exc:\n    print(exc.status, exc.message)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith("415 HEIC/HEIF images need the optional pillow-heif package")
    assert "pip install pillow-heif" in out


def test_a_tiff_pillow_cannot_read_is_named_as_a_tiff() -> None:
    # A minimal little-endian TIFF header whose first directory is garbage: Pillow cannot identify it.
    with pytest.raises(UnsupportedImage, match="This TIFF cannot be read"):
        decode_image(b"II*\x00\x08\x00\x00\x00" + b"\xff" * 64, **LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "HEIF", "AVIF"])
def test_exif_orientation_is_applied_once(fmt: str) -> None:
    assert heif_support()
    image = _photo(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode_image(_encode(image, fmt, exif=exif.tobytes()), **LIMITS)
    assert (decoded.width, decoded.height) == (20, 40)


def test_alpha_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    decoded = decode_image(_encode(rgba, "PNG"), **LIMITS)
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_palette_and_16_bit_images_become_rgb() -> None:
    cmyk = _photo().convert("CMYK")
    assert decode_image(_encode(cmyk, "JPEG"), **LIMITS).image.mode == "RGB"
    palette = _photo().convert("P")
    palette.info["transparency"] = 0
    assert decode_image(_encode(palette, "PNG"), **LIMITS).image.mode == "RGB"
    deep = Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).convert("I;16")
    decoded = decode_image(_encode(deep, "PNG"), **LIMITS)
    assert decoded.image.mode == "RGB"
    # the range is scaled, not clipped to white
    low, high = decoded.image.getextrema()[0]
    assert low < 10 and high > 240


def _ramp(dtype: str) -> np.ndarray:
    return np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(dtype)


@pytest.mark.parametrize(
    ("name", "image"),
    [
        # "Macintosh" byte order: Pillow has no conversion from it and called the file corrupt
        ("16-bit big-endian TIFF", Image.frombytes("I;16B", (64, 64), (_ramp("f8") * 60000).astype(">u2").tobytes())),
        # values in 0-1: Pillow's conversion clips them to 0 and 1, a black image
        ("float TIFF", Image.fromarray(_ramp("float32"), "F")),
        ("32-bit integer TIFF", Image.fromarray((_ramp("f8") * 1e6).astype(np.int32), "I")),
    ],
)
def test_deep_greyscale_tiffs_keep_their_picture(name: str, image: Image.Image) -> None:
    decoded = decode_image(_encode(image, "TIFF"), **LIMITS)
    grey = np.asarray(decoded.image)[:, :, 0]
    assert decoded.image.mode == "RGB"
    assert grey.min() < 5 and grey.max() > 250, name
    assert grey[0, 0] < grey[32, 32] < grey[-1, -1], name  # the ramp is still a ramp


def test_a_float_image_with_nan_and_infinity_decodes() -> None:
    values = _ramp("float32")
    values[0, 1:4] = (np.nan, np.inf, -np.inf)
    image = decode_image(_encode(Image.fromarray(values, "F"), "TIFF"), **LIMITS).image
    # the finite range (0 to 1) spans 0-255; NaN is the darkest, each infinity its own end
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 0, 255, 0]
    assert image.getpixel((63, 63))[0] == 255


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(out.getvalue(), **LIMITS)
    r, _g, b = decoded.image.getpixel((0, 0))
    assert r > 200 and b < 50


def test_byte_limit_is_413_before_decoding() -> None:
    with pytest.raises(ImageTooLarge, match="MAX_FILE_SIZE") as info:
        decode_image(b"x" * 101, max_file_size=100, max_image_pixels=10)
    assert info.value.status == 413


def test_pixel_limit_is_413_from_the_header_alone() -> None:
    # A 3000x3000 PNG of one colour is tiny on disk but 9 Mpx: refused before the full decode.
    bomb = _encode(Image.new("RGB", (3000, 3000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS") as info:
        decode_image(bomb, max_file_size=10_000_000, max_image_pixels=1_000_000)
    assert info.value.status == 413


def test_truncated_image_is_422_and_empty_or_junk_is_415() -> None:
    data = _encode(_photo(200, 200), "JPEG")
    with pytest.raises(UndecodableImage) as info:
        decode_image(data[: len(data) // 3], **LIMITS)
    assert info.value.status == 422
    with pytest.raises(UnsupportedImage) as empty:
        decode_image(b"", **LIMITS)
    assert empty.value.status == 415


def test_thumbnail_is_a_small_jpeg() -> None:
    thumb = make_thumbnail(_photo(1000, 500), size=128)
    image = Image.open(io.BytesIO(thumb))
    assert image.format == "JPEG"
    assert max(image.size) == 128


def _pillow_thumbnail(photo: Image.Image, size: int = 256) -> bytes:
    reference = photo.copy()
    reference.thumbnail((size, size))
    buf = io.BytesIO()
    reference.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1000, 3), (3, 1000), (200, 100), (4000, 3000)])
def test_thumbnail_is_pillows_own_without_copying_the_image(size: tuple[int, int]) -> None:
    """Resized into a new image, not a copy resized in place, and encoded through a descriptor
    (so Pillow lets go of the GIL): byte for byte what `Image.thumbnail` + a BytesIO encode give."""
    photo = _photo(*size)
    assert make_thumbnail(photo) == _pillow_thumbnail(photo)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc (Linux)")
def test_thumbnails_leave_no_file_open() -> None:
    photo = _photo(640, 480)
    fds = len(os.listdir("/proc/self/fd"))
    assert len({make_thumbnail(photo) for _ in range(50)}) == 1
    assert len(os.listdir("/proc/self/fd")) == fds


def test_thumbnail_falls_back_to_a_temporary_file_where_memfd_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _photo(640, 480)
    expected = make_thumbnail(photo)

    def refused(*_args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused, raising=False)
    assert make_thumbnail(photo) == expected


def _close(pixel: object, expected: tuple[int, ...], within: int = 2) -> bool:
    assert isinstance(pixel, tuple)
    return all(abs(a - b) <= within for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF", "AVIF", "HEIF"])
def test_a_wide_gamut_photo_is_brought_into_srgb_for_the_model_and_its_thumbnail(fmt: str) -> None:
    """An iPhone tags its photos Display P3: read as sRGB they are washed out, to the model and
    on the page (a browser takes an untagged JPEG thumbnail for sRGB)."""
    extra: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}
    photo = Image.new("RGB", (600, 400), P3_ORANGE)
    decoded = decode_image(_encode(photo, fmt, icc_profile=display_p3(), **extra), **LIMITS)
    thumb = Image.open(io.BytesIO(make_thumbnail(decoded.image)))
    assert thumb.size == (256, 171) and "icc_profile" not in thumb.info
    assert _close(thumb.getpixel((100, 80)), P3_ORANGE_IN_SRGB, within=3)  # a JPEG of its own
    small = to_srgb(decoded.image.resize((224, 224)))  # what the captioner does
    assert _close(small.getpixel((100, 100)), P3_ORANGE_IN_SRGB)
    assert to_srgb(small) is small  # converted once


def test_srgb_untagged_and_unreadable_profiles_leave_the_pixels_alone() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, None, b"not an ICC profile at all", display_p3()[:200]):
        extra = {"icc_profile": profile} if profile else {}
        decoded = decode_image(_encode(Image.new("RGB", (64, 48), P3_ORANGE), "PNG", **extra), **LIMITS)
        assert "icc_profile" not in decoded.image.info  # nothing for to_srgb to do
        assert to_srgb(decoded.image) is decoded.image
        assert Image.open(io.BytesIO(make_thumbnail(decoded.image))).getpixel((5, 5)) == P3_ORANGE


def test_a_profile_for_other_pixels_than_the_images_is_ignored() -> None:
    # A greyscale PNG carrying an RGB profile: the pixels are used as they are, not misread.
    decoded = decode_image(_encode(Image.new("L", (64, 48), 90), "PNG", icc_profile=display_p3()), **LIMITS)
    assert decoded.image.getpixel((3, 3)) == (90, 90, 90) and "icc_profile" not in decoded.image.info


def test_cmyk_with_its_printers_profile_is_converted_through_it() -> None:
    """Pillow's own CMYK conversion ignores the profile: full cyan ink became (0, 255, 255)."""
    cyan_lab = (55.0, -37.0, -50.0)
    corners = [(0.0, 0.0, 0.0) if i & 1 else cyan_lab if i == 8 else (50.0, 0.0, 0.0) for i in range(16)]
    profile = cmyk_profile(corners)
    data = _encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", icc_profile=profile, quality=100)
    decoded = decode_image(data, **LIMITS)
    # The same Lab colour taken to sRGB by another road: a Lab image (a and b offset by 128).
    lightness, a, b = cyan_lab
    lab = Image.new("LAB", (1, 1), (round(lightness * 255 / 100), round(a + 128), round(b + 128)))
    expected = ImageCms.profileToProfile(
        lab, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), outputMode="RGB"
    )
    assert expected is not None and _close(expected.getpixel((0, 0)), (0, 151, 218), within=8)  # a print cyan
    assert _close(decoded.image.getpixel((10, 10)), expected.getpixel((0, 0)))  # type: ignore[arg-type]
    assert "icc_profile" not in decoded.image.info  # already sRGB
    untagged = decode_image(_encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", quality=100), **LIMITS)
    assert _close(untagged.image.getpixel((10, 10)), (0, 255, 255))  # no profile: Pillow's conversion
