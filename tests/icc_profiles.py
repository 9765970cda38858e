"""ICC profiles written byte by byte for the colour tests: no profile files ship with the
machine, and Pillow can only make sRGB, Lab and XYZ ones.

`display_p3()` is Apple's Display P3 (the primaries an iPhone tags its photos with, adapted to
D50 as in Apple's own profile, with the sRGB curve). `cmyk_profile(corners)` is an input
profile for CMYK whose 16 corners (C, M, Y, K each 0 or 255) land on the given Lab colours,
interpolated between: enough to tell a conversion through the profile from Pillow's own.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

Lab = tuple[float, float, float]

# Display P3's colorants (D50), as in Apple's "Display P3" profile.
P3_COLORANTS = ((0.515102, 0.241196, -0.00105), (0.291965, 0.692236, 0.041882), (0.157153, 0.066588, 0.784912))

# Display P3's (200, 100, 50) in sRGB, worked out from the two spaces' definitions (linearise,
# the P3-to-sRGB matrix, re-encode), not by the colour engine under test.
P3_ORANGE, P3_ORANGE_IN_SRGB = (200, 100, 50), (215, 93, 31)


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def _srgb_curve() -> bytes:
    """parametricCurveType 3: Y = (aX + b)^g for X >= d, else cX (the sRGB curve)."""
    params = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
    return b"para" + bytes(4) + struct.pack(">HH", 3, 0) + b"".join(_s15(p) for p in params)


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    # textDescriptionType: the ASCII part, then empty Unicode and ScriptCode parts.
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(8) + bytes(1 + 67)


def _profile(device_class: bytes, space: bytes, tags: Sequence[tuple[bytes, bytes]]) -> bytes:
    table_end = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags:
        data += bytes(-(table_end + len(data)) % 4)
        table += signature + struct.pack(">II", table_end + len(data), len(body))
        data += body
    size = table_end + len(data)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + device_class
        + space
        + (b"Lab " if space == b"CMYK" else b"XYZ ")
        + bytes(12)
        + b"acsp"
        + b"APPL"
        + bytes(4 + 4 + 4 + 8)
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + bytes(4 + 16 + 28)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + data


def rgb_matrix_profile(name: str, colorants: Sequence[tuple[float, float, float]]) -> bytes:
    """A display profile: three colorants (D50) and the sRGB curve on each channel."""
    red, green, blue = colorants
    return _profile(
        b"mntr",
        b"RGB ",
        [
            (b"desc", _desc(name)),
            (b"wtpt", _xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", _xyz(*red)),
            (b"gXYZ", _xyz(*green)),
            (b"bXYZ", _xyz(*blue)),
            (b"rTRC", _srgb_curve()),
            (b"gTRC", _srgb_curve()),
            (b"bTRC", _srgb_curve()),
            (b"cprt", b"text" + bytes(4) + b"none\0"),
        ],
    )


def display_p3() -> bytes:
    return rgb_matrix_profile("Display P3", P3_COLORANTS)


def cmyk_profile(corners: Sequence[Lab]) -> bytes:
    """A printer profile with one lut16 (A2B0): `corners[i]` is the Lab colour of the corner whose
    bits, C first, spell `i` (so corners[0] is paper, corners[8] is cyan, corners[1] is black)."""
    assert len(corners) == 16
    identity = struct.pack(">HH", 0, 0xFFFF)
    clut = b"".join(
        struct.pack(">HHH", round(lightness * 0xFF00 / 100), round((a + 128) * 256), round((b + 128) * 256))
        for lightness, a, b in corners
    )
    matrix = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # 4 inputs, 3 outputs, 2 grid points; 2-entry input and output tables (straight lines).
    lut = b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + matrix + struct.pack(">HH", 2, 2)
    lut += identity * 4 + clut + identity * 3
    return _profile(
        b"prtr",
        b"CMYK",
        [(b"desc", _desc("test CMYK")), (b"wtpt", _xyz(0.9642, 1.0, 0.8249)), (b"A2B0", lut)],
    )
