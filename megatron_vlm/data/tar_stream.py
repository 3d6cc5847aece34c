"""A lean reader of tar members: one header parse per member, data read only when asked for.

Python's ``tarfile`` spends ~30 us per member on header objects we never use (owners, times,
modes, sparse maps), which on shards of small tiles is a third of the loader's CPU time; this
reader takes ~3 us. It reads what shards are written as and what common tools write: ustar and
GNU headers, GNU long names (``L``), pax extended headers (``x``, Solaris ``X``: ``path`` and
``size``; global ``g`` headers are passed over), base-256 sizes, and gzip / bzip2 / xz compressed
tars. Members that are not regular files (directories, links, ...) are passed over like
``tarfile.isfile()``; sparse files, which no shard writer produces, are refused.

Damage raises instead of ending quietly where it can be seen (``tarfile`` stops at a bad header
after the first member as if the archive had ended): ``TarHeaderError`` for a header that fails
its checksum, has a malformed number or pax record, or is cut short; ``TarTruncatedError`` for
member data that ends early or compressed data that cannot be decompressed. A file cut exactly
at a header boundary, or inside data that is skipped unread, ends like a complete archive (as
with ``tarfile``): the caller learns of it only from what is missing.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_PAX = (b"x", b"X")  # POSIX pax extended header, and Solaris' older spelling of it
_SPARSE = b"S"
_CORRUPT_STREAM = (zlib.error, lzma.LZMAError, OSError, EOFError)  # what decompressors raise
_SKIPPED_DATA = 1 << 20  # read-and-discard step when the stream cannot seek


class TarHeaderError(ValueError):
    """A header that cannot be trusted: bad checksum, malformed field, or cut short."""


class TarTruncatedError(EOFError):
    """Member data (or the long name / pax record before it) ends before its stated size."""


@dataclass
class TarMember:
    name: str
    size: int
    offset: int  # header offset in the (uncompressed) stream, for error messages


def _seekable(f) -> bool:
    seekable = getattr(f, "seekable", None)  # webdataset's pipe streams have no seekable()
    return bool(seekable and seekable())


class _Prefixed:
    """A non-seekable stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, f: BinaryIO):
        self._head, self._f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._f.read(n)
        if n < 0:
            data, self._head = self._head + self._f.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        return data + (self._f.read(n - len(data)) if len(data) < n else b"")

    def seekable(self) -> bool:
        return False


def _read_full(f, n: int) -> bytes:
    """n bytes from f, fewer only at the end of the stream (pipes return short reads)."""
    parts, got = [], 0
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def open_tar_stream(f: BinaryIO) -> "TarReader":
    """A reader of ``f``, through the decompressor its first bytes ask for (gzip / bzip2 / xz).

    The magic numbers are checked in full (bzip2's block header too), so a plain tar whose first
    member happens to be named ``BZh...`` is not taken for a compressed one."""
    raw = f
    head = _read_full(f, 10)
    if _seekable(f):
        f.seek(-len(head), 1)
    else:
        f = _Prefixed(head, f)
    if head.startswith(b"\x1f\x8b\x08"):
        return TarReader(gzip.GzipFile(fileobj=f, mode="rb"), raw)
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0" and head[4:10] == b"1AY&SY":
        return TarReader(bz2.BZ2File(f, mode="rb"), raw)
    if head.startswith(b"\xfd7zXZ\x00"):
        return TarReader(lzma.LZMAFile(f, mode="rb"), raw)
    return TarReader(f, raw)


def _field(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _number(raw: bytes, what: str, offset: int) -> int:
    """A header number: octal text, or GNU base-256 (first byte 0x80) for sizes over 8 GiB.
    Negative numbers (base-256 0xff) are refused: no field read here may be negative."""
    if raw[:1] == b"\x80":
        return int.from_bytes(raw[1:], "big")
    text = _field(raw).strip(b" ")
    if not text.strip(b"01234567"):  # octal digits only (or none: 0)
        return int(text, 8) if text else 0
    raise TarHeaderError(f"tar header at byte {offset}: malformed {what} field {raw!r}")


def _checksum_ok(header: bytes, offset: int) -> bool:
    stored = _number(header[148:156], "checksum", offset)
    unsigned = sum(header) - sum(header[148:156]) + 8 * 0x20
    if stored == unsigned:
        return True
    # Some old tars sum signed chars: each byte over 127 then counts 256 less.
    high = sum(b > 127 for b in header[:148]) + sum(b > 127 for b in header[156:])
    return stored == unsigned - 256 * high


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records -> {key: value}; a malformed record raises (a length
    that does not move forward would otherwise loop for ever)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        digits = data[pos:space] if space > pos else b""
        length = int(digits) if digits.isdigit() else 0
        end = pos + length
        if length < len(digits) + 3 or end > len(data) or data[end - 1:end] != b"\n" or b"=" not in data[space:end]:
            raise TarHeaderError(f"pax header at byte {offset}: malformed record at byte {pos} of its data")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


class TarReader:
    """Iterate a tar stream's regular-file members; ``read()`` the current one's data or leave it."""

    def __init__(self, fileobj: BinaryIO, underlying: BinaryIO | None = None):
        self._f = fileobj  # what is read: the file, or a decompressor / prefix wrapper over it
        self._file = fileobj if underlying is None else underlying  # what close() closes last
        self._seekable = _seekable(fileobj)
        self._pos = 0  # stream offset of the next unread byte
        self._unread = 0  # data + padding of the current member still before the next header

    def _read_up_to(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the stream; corrupt compressed data raises here."""
        try:
            data = _read_full(self._f, n)
        except _CORRUPT_STREAM as exc:
            raise self._unreadable(exc) from exc
        self._pos += len(data)
        return data

    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._read_up_to(n)
        if len(data) < n:
            raise TarTruncatedError(f"{what}: {len(data)} of {n} bytes before the end of the file")
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        try:
            if self._seekable:
                self._f.seek(n, 1)
                self._pos += n
                return
            while n:
                got = len(self._f.read(min(n, _SKIPPED_DATA)))
                if not got:
                    return  # the next header read reports the end
                self._pos += got
                n -= got
        except _CORRUPT_STREAM as exc:
            raise self._unreadable(exc) from exc

    def _unreadable(self, exc: Exception) -> TarTruncatedError:
        return TarTruncatedError(f"unreadable data after byte {self._pos}: {type(exc).__name__}: {exc}")

    def _header(self) -> bytes | None:
        """The next 512-byte header, or None at the end of the archive."""
        offset = self._pos
        header = self._read_up_to(BLOCK)
        if not header and offset == 0:
            raise TarHeaderError("the file is empty (a tar archive has at least its end blocks)")
        if header.count(0) == len(header):  # end of file, or (part of) the end-of-archive zeros
            return None
        if len(header) < BLOCK:
            raise TarHeaderError(f"tar header at byte {offset} is cut short ({len(header)} of {BLOCK} bytes)")
        if not _checksum_ok(header, offset):
            raise TarHeaderError(f"tar header at byte {offset} fails its checksum")
        return header

    def __iter__(self) -> Iterator[TarMember]:
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            self._skip(self._unread)
            self._unread = 0
            offset = self._pos
            header = self._header()
            if header is None:
                return
            kind = header[156:157]
            size = _number(header[124:136], "size", offset)
            if kind in (b"L", b"g") + _PAX:  # metadata for the next member: read it now
                data = self._read_exact(size, f"tar header data at byte {offset}")
                self._skip(-size % BLOCK)
                if kind == b"L":
                    long_name = _field(data).decode("utf-8", "surrogateescape")
                elif kind in _PAX:
                    pax = _pax_records(data, offset)
                continue
            if kind == _SPARSE or "GNU.sparse.major" in pax or "GNU.sparse.size" in pax:
                raise TarHeaderError(f"tar member at byte {offset} is a sparse file, which shards never "
                                     "hold (write them without --sparse)")
            name = _field(header[0:100]).decode("utf-8", "surrogateescape")
            if header[257:263] == b"ustar\0":  # POSIX ustar: a name prefix (not in GNU headers)
                prefix = _field(header[345:500]).decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}" if prefix else name
            name = pax.get("path", long_name or name)
            if "size" in pax:
                if not pax["size"].isdigit():
                    raise TarHeaderError(f"pax header before byte {offset}: malformed size {pax['size']!r}")
                size = int(pax["size"])
            long_name, pax = None, {}
            self._unread = size + (-size % BLOCK)
            if kind in _REGULAR and not name.endswith("/"):  # old tars mark directories by a "/"
                yield TarMember(name=name, size=size, offset=offset)

    def close(self) -> None:
        """Close the decompressor (if any) and the file under it. Raises what the file's close
        raises: for a ``pipe:`` stream, the command's failure."""
        try:
            if self._f is not self._file:
                getattr(self._f, "close", lambda: None)()  # a decompressor; leaves its file open
        finally:
            self._file.close()

    def read(self, member: TarMember) -> bytes:
        """The data of ``member``, which must be the member the iteration is at."""
        data = self._read_exact(member.size, f"member {member.name}")
        self._unread -= member.size
        return data

