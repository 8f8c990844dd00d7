"""Uploads for `cxr-fastai serve`: the multipart body read as it streams in, in memory, within a size cap;
each file decoded by the same reader as `predict` (io.images.read_grey / io.dicom.read_dicom).

Why not Starlette's `request.form()`: it spools every file above 1 MB to a temporary file on disk and
learns the size only after the whole body has arrived. Here the body is parsed chunk by chunk as it
arrives (python-multipart's streaming parser), nothing is written to disk, and the request is refused with
413, naming the file being received, as soon as the files in it pass the cap.

Decoding: io.images.read_grey on the bytes in memory (it and io.dicom.read_dicom take an upload's bytes
beside the name they report), so an upload gives the array, the checks and the error messages `predict`
gives for the same file, naming the uploaded file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import AsyncIterator

import numpy as np

from ..errors import ImageReadError

FIELD = "files"
MAX_NAME = 200            # characters of a file name kept (names are echoed back, never used as paths)
DRAIN_LIMIT = 64 << 20    # bytes of an over-size body read and dropped so that the client still sees the 413


@dataclass
class Upload:
    filename: str
    data: bytes


class UploadError(Exception):
    """The request as a whole is refused: `status` and a message that says what to do."""

    def __init__(self, status: int, detail: str, filename: str | None = None):
        super().__init__(detail)
        self.status, self.detail, self.filename = status, detail, filename

    def body(self) -> dict:
        return {"detail": self.detail, **({"filename": self.filename} if self.filename is not None else {})}


def clean_name(raw: bytes | str | None, index: int) -> str:
    """A file name fit to echo back: its last path component, printable, at most MAX_NAME characters;
    `file N` when the client sent none."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    name = PureWindowsPath(PurePosixPath(raw or "").name).name   # drop any folder part, / or \
    name = "".join(c if c.isprintable() else "?" for c in name).strip()
    if len(name) > MAX_NAME:
        name = name[:MAX_NAME - 3] + "..."
    return name or f"file {index + 1}"


class _Collector:
    """python-multipart callbacks: the parts named FIELD, kept in memory, the file bytes capped."""

    def __init__(self, max_bytes: int, max_files: int, max_mb: float):
        self.max_bytes, self.max_files, self.max_mb = max_bytes, max_files, max_mb
        self.uploads: list[Upload] = []
        self.file_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._chunks: list[bytes] | None = None    # the current part's data, when it is one we keep
        self._name = ""
        self._open = False                         # inside a part (its end not yet seen)

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._disposition, self._chunks, self._name, self._open = b"", None, "", True

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, opts = parse_options_header(self._disposition)
        if opts.get(b"name", b"").decode("utf-8", "replace") != FIELD:
            return  # another field: its bytes are not kept (they still count against the request's size)
        if len(self.uploads) >= self.max_files:
            raise UploadError(400, f"more than {self.max_files} files in one request; send at most "
                                   f"{self.max_files} per request")
        self._name = clean_name(opts.get(b"filename"), len(self.uploads))
        self._chunks = []

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._chunks is None:
            return
        self.file_bytes += end - start
        if self.file_bytes > self.max_bytes:
            raise UploadError(413, f"{self._name}: upload too large: the files of one request may hold at most "
                                   f"{self.max_mb:g} MB (--max-mb); send smaller or fewer files per request",
                              filename=self._name)
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self._chunks is not None:
            self.uploads.append(Upload(self._name, b"".join(self._chunks)))
        self._chunks, self._open = None, False


async def read_uploads(content_type: str | None, stream: AsyncIterator[bytes], max_mb: float,
                       max_files: int) -> list[Upload]:
    """The files of multipart field FIELD, in the order sent; raises UploadError (400, 413, 415)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise UploadError(415, f"send the images as multipart/form-data in field {FIELD!r} "
                               f"(e.g. curl -F {FIELD}=@image.png), not {ctype.decode('latin-1') or 'no content type'}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary parameter; let the HTTP client build the body")
    max_bytes = int(max_mb * 1_000_000)
    col = _Collector(max_bytes, max_files, max_mb)
    try:
        parser = MultipartParser(boundary, col.callbacks())
    except (FormParserError, ValueError) as e:
        raise UploadError(400, f"bad multipart boundary ({e})") from e
    # the parts' headers and any other fields are bounded too: a body may exceed the file cap by 1 MB
    body_cap = max_bytes + (1 << 20)
    seen = 0
    chunks = stream.__aiter__()
    try:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > body_cap:
                raise UploadError(413, f"request body larger than {body_cap:,} bytes; the files of one request "
                                       f"may hold at most {max_mb:g} MB (--max-mb)")
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except UploadError as e:
        if e.status == 413:
            await _drain(chunks, seen)
        raise
    except FormParserError as e:
        raise UploadError(400, f"malformed multipart body ({type(e).__name__}); let the HTTP client build it "
                               f"(e.g. curl -F {FIELD}=@image.png)") from e
    if col._open:
        raise UploadError(400, "the multipart body ends inside a part: the upload was cut short; send it again")
    if not col.uploads:
        raise UploadError(400, f"no files: send one or more images in the multipart field {FIELD!r} "
                               f"(e.g. curl -F {FIELD}=@image.png)")
    return col.uploads


async def _drain(chunks: AsyncIterator[bytes], seen: int) -> None:
    """Read and drop the rest of an over-size body (up to DRAIN_LIMIT) so the client gets the response
    instead of a reset connection; a larger body is cut off."""
    try:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > DRAIN_LIMIT:
                return
    except Exception:  # the client went away: nothing to answer
        return


# ------------------------------------------------------------------------------------------ decoding

def decode_upload(data: bytes, name: str) -> np.ndarray:
    """(H, W) uint8 grey, as `predict` reads the same file, or ImageReadError whose message starts with
    `name`: io.images.read_grey on the bytes in memory (DICOM: a .dcm/.dicom name or the 'DICM' preamble)."""
    from ..io.images import read_grey

    if not data:
        raise ImageReadError(f"{name}: empty file (0 bytes); send the image itself")
    try:
        return read_grey(name, data)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError(f"{name}: image too large to decode in this server's memory; resize it") from None
    except Exception as e:  # a decoder's own bug: the type only (a message could quote header bytes)
        raise ImageReadError(f"{name}: cannot decode the file ({type(e).__name__})") from None
