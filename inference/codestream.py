"""The dimensions a compressed frame's own header declares, read without decoding it.

A decoder allocates and fills what the codestream declares, not what the DICOM header's Rows and Columns say:
a JPEG of a few hundred bytes whose frame header claims 65535 x 65535 keeps a decoder busy for minutes and
gigabytes. PS3.5 8.2 requires the two to agree, so a frame whose codestream disagrees is refused undecoded.
"""

from __future__ import annotations

import struct

_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
# Start Of Frame markers: JPEG SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC) (ISO/IEC 10918-1 B.1.1.3), and
# JPEG-LS SOF55 (ISO/IEC 14495-1 C.2.2).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_FILL = 0xFF
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length


def declared_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) of a JPEG or JPEG-LS frame header, or of a JPEG 2000 SIZ segment (ISO/IEC 15444-1 A.5.1);
    None for another kind of codestream or a header that cannot be found."""
    if frame.startswith(_JPEG_SOI):
        return _jpeg_size(frame)
    if frame.startswith(_J2K_SOC_SIZ) and len(frame) >= 24:
        width, height, left, top = struct.unpack(">4L", frame[8:24])  # Xsiz, Ysiz, XOsiz, YOsiz
        return height - top, width - left
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    """The frame header's number of lines and samples per line (ISO/IEC 10918-1 B.2.2), skipping the segments
    before it by their lengths."""
    at = len(_JPEG_SOI)
    while at + 9 <= len(frame) and frame[at] == _FILL:
        marker = frame[at + 1]
        if marker == _FILL or marker in _STANDALONE:
            at += 1 if marker == _FILL else 2
            continue
        if marker in _SOF_MARKERS:
            rows, columns = struct.unpack(">HH", frame[at + 5 : at + 9])
            return rows, columns
        [length] = struct.unpack(">H", frame[at + 2 : at + 4])
        at += 2 + length
    return None
