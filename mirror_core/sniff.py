"""What bytes are when they are not an image: an error row should say that a web link
answered with an HTML page, or that a file is an archive, not only that Pillow could not
identify it."""
from __future__ import annotations

# (how the bytes begin, what they are); tried in order on the first bytes
LFS_POINTER = "a Git LFS pointer: the file's content was never downloaded (run `git lfs pull` in its repository)"
SIGNATURES: tuple[tuple[tuple[bytes, ...], str], ...] = (
    # a repository cloned without its large files (a Hugging Face dataset) holds these instead
    ((b"version https://git-lfs.github.com/spec/",), LFS_POINTER),
    ((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--"), "an HTML page (a web link that answers with a page?)"),
    ((b"<?xml", b"<svg"), "XML or SVG (vector drawings are not read)"),
    ((b"{", b"["), "JSON text"),
    ((b"pk\x03\x04",), "a zip archive (scan it as the input: `mirror scan --input FILE.zip`)"),
    ((b"%pdf-",), "a PDF document"),
    ((b"\x1f\x8b",), "gzip-compressed data"),
    ((b"7z\xbc\xaf\x27\x1c",), "a 7-Zip archive"),
    ((b"rar!\x1a\x07",), "a RAR archive"),
)
TAR_MAGIC_AT = 257  # 'ustar' in a tar header
VIDEO_BRANDS = (b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5", b"avc1", b"dash")


def what_bytes_are(data: bytes) -> str | None:
    """A short phrase naming what `data` holds, where its first bytes tell; None where not."""
    head = data[:64].lstrip().lower()
    if data[TAR_MAGIC_AT : TAR_MAGIC_AT + 5] == b"ustar":
        return "a tar archive (scan it as the input: `mirror scan --input FILE.tar`)"
    if data[4:8] == b"ftyp":  # an ISO media file: its brand says which (HEIC and AVIF decode)
        return "a video (MP4 / QuickTime)" if data[8:12] in VIDEO_BRANDS else None
    for prefixes, what in SIGNATURES:
        if head.startswith(prefixes):
            return what
    if data[:64] and all(32 <= b < 127 or b in b"\t\r\n" for b in data[:64]):
        return "text"
    return None


def what_file_holds(f) -> str | None:
    """`what_bytes_are` of an open, seekable binary file (read from its start): what a
    shard that cannot be read as one is."""
    f.seek(0)
    return what_bytes_are(f.read(TAR_MAGIC_AT + 8))


def not_an_image(data: bytes) -> str:
    """The message for bytes no image decoder identifies."""
    what = what_bytes_are(data)
    return (f"not an image: {what}" if what else "not an image any installed decoder identifies") + \
        f" ({len(data):,} bytes, starting {data[:16]!r})"
