"""The lean tar reader against Python's tarfile: same members and bytes in every format tarfile
writes, and damage raised (not swallowed) where tarfile would stop quietly."""

from __future__ import annotations

import io
import tarfile

import pytest

from megatron_vlm.data.tar_stream import TarHeaderError, TarTruncatedError, open_tar_stream

FILES = [
    ("s000.json", b'{"id": 0}'),
    ("s000.m00.t00.png", bytes(range(256)) * 3),
    ("s001.json", b""),  # an empty member
    ("d" * 60 + "/" + "x" * 80 + ".json", b"long name"),  # over 100 characters: prefix / L / path
    ("s002.caf\u00e9.txt", b"non-ascii name"),
    ("s003.bin", b"\x00" * 1024),  # data that looks like end blocks
]


def _archive(fmt: int, compression: str = "", files=FILES, with_dir: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tar:
        if with_dir:
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _ours(data: bytes, only=lambda name: True) -> list[tuple[str, bytes]]:
    reader = open_tar_stream(io.BytesIO(data))
    return [(m.name, reader.read(m) if only(m.name) else None) for m in reader]


class _Pipe(io.RawIOBase):
    """A stream that can only be read forwards, in small pieces (like a pipe)."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    def readable(self):
        return True

    def read(self, n=-1):
        n = len(self._data) - self._pos if n < 0 else min(n, 700)
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def seekable(self):
        return False


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_same_members_as_tarfile(fmt, compression):
    data = _archive(fmt, compression)
    expected = _tarfile_members(data)
    assert [n for n, _ in expected] == [n for n, _ in FILES]  # the directory is not a member
    assert _ours(data) == expected
    reader = open_tar_stream(_Pipe(data))
    assert [(m.name, reader.read(m)) for m in reader] == expected


def test_unread_members_are_skipped_on_seekable_and_forward_only_streams():
    data = _archive(tarfile.GNU_FORMAT)
    wanted = {"s001.json", "s003.bin"}
    expected = [(n, d if n in wanted else None) for n, d in _tarfile_members(data)]
    assert _ours(data, only=wanted.__contains__) == expected
    reader = open_tar_stream(_Pipe(data))
    assert [(m.name, reader.read(m) if m.name in wanted else None) for m in reader] == expected


def test_a_damaged_header_after_the_first_member_raises():
    data = bytearray(_archive(tarfile.USTAR_FORMAT, with_dir=False, files=FILES[:3]))
    second = 512 + 512  # header, 9 bytes of data padded to one block
    assert data[second:second + 4] == b"s000"
    data[second + 10] ^= 0x55  # one byte of the second member's name
    assert len(_tarfile_members(bytes(data))) == 1  # tarfile ends there as if the archive had ended
    reader = open_tar_stream(io.BytesIO(bytes(data)))
    members = iter(reader)
    first = next(members)
    assert (first.name, reader.read(first)) == FILES[0]
    with pytest.raises(TarHeaderError, match="at byte 1024 fails its checksum"):
        next(members)


def test_truncation_inside_data_and_inside_a_header_raise():
    data = _archive(tarfile.USTAR_FORMAT, with_dir=False, files=FILES[:2])
    cut = data[:512 + 512 + 512 + 300]  # inside the second member's 768 bytes of data
    reader = open_tar_stream(io.BytesIO(cut))
    members = iter(reader)
    reader.read(next(members))
    second = next(members)
    with pytest.raises(TarTruncatedError, match="s000.m00.t00.png: 300 of 768 bytes"):
        reader.read(second)
    reader = open_tar_stream(io.BytesIO(data[:512 + 512 + 200]))
    members = iter(reader)
    reader.read(next(members))
    with pytest.raises(TarHeaderError, match="cut short"):
        next(members)


@pytest.mark.parametrize("content", [b"", b"this is not a tar file" * 40])
def test_not_a_tar_file_raises_at_the_first_header(content):
    with pytest.raises(TarHeaderError):
        list(open_tar_stream(io.BytesIO(content)))


def test_end_of_file_at_a_header_boundary_ends_the_archive():
    data = _archive(tarfile.USTAR_FORMAT, with_dir=False, files=FILES[:2])
    without_end_blocks = data[:512 + 512 + 512 + 1024]
    reader = open_tar_stream(io.BytesIO(without_end_blocks))
    assert [(m.name, reader.read(m)) for m in reader] == FILES[:2]


def test_a_header_checksummed_with_signed_bytes_is_accepted():
    """Old tar implementations summed the header as signed chars; tarfile accepts both sums."""
    data = bytearray(_archive(tarfile.USTAR_FORMAT, with_dir=False, files=[FILES[4]]))
    header = data[:512]
    assert any(b > 127 for b in header[:100])  # the UTF-8 name has bytes over 127
    signed = 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(header) if not 148 <= i < 156)
    data[148:156] = b"%06o\0 " % signed
    assert _tarfile_members(bytes(data)) == [FILES[4]]
    assert _ours(bytes(data)) == [FILES[4]]
    data[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(TarHeaderError, match="checksum"):
        _ours(bytes(data))


# ---- damage a shard can carry (each case found in review; tarfile as the reference) ----------
def _pax_archive() -> bytearray:
    return bytearray(_archive(tarfile.PAX_FORMAT, with_dir=False, files=[FILES[3]]))


@pytest.mark.parametrize("record", [b"0", b"-3", b"99999"])
def test_a_malformed_pax_record_raises_instead_of_looping(record):
    data = _pax_archive()
    at = data.index(b" path=")  # "<len> path=...": overwrite the length digits
    start = data.rindex(b"\n", 0, at) + 1 if b"\n" in data[512:at] else 512
    data[start:at] = record.rjust(at - start, b"0")
    with pytest.raises(TarHeaderError, match="pax header"):
        _ours(bytes(data))


def test_a_malformed_pax_size_raises():
    info = tarfile.TarInfo("s0.json")
    info.size = 2
    info.pax_headers = {"size": "1z"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(TarHeaderError, match="malformed size"):
        _ours(buf.getvalue())


@pytest.mark.parametrize("compression", ["gz", "xz"])
def test_corrupt_compressed_data_raises_truncated(compression):
    data = bytearray(_archive(tarfile.GNU_FORMAT, compression))
    for i in range(20, len(data) - 20):
        data[i] ^= 0xFF
    with pytest.raises(TarTruncatedError, match="unreadable data"):
        _ours(bytes(data))


def test_a_plain_tar_whose_first_name_starts_like_bzip2_is_read_as_a_tar():
    files = [("BZh7x0.json", b"{}"), ("BZh7x0.png", b"png")]
    data = _archive(tarfile.USTAR_FORMAT, with_dir=False, files=files)
    assert _ours(data) == _tarfile_members(data) == files


def test_a_file_cut_inside_its_end_zeros_is_complete():
    data = _archive(tarfile.USTAR_FORMAT, with_dir=False, files=FILES[:2])
    end = 512 + 512 + 512 + 1024  # two members, then the end-of-archive zeros
    assert _ours(data[:end + 100]) == _tarfile_members(data[:end + 100]) == FILES[:2]


def test_old_style_directories_are_passed_over_and_sparse_files_refused():
    d = tarfile.TarInfo("dir/")
    d.type = tarfile.AREGTYPE  # a V7 tar: no directory type, a trailing slash
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(d)
        info = tarfile.TarInfo(FILES[0][0])
        info.size = len(FILES[0][1])
        tar.addfile(info, io.BytesIO(FILES[0][1]))
    assert _ours(buf.getvalue()) == _tarfile_members(buf.getvalue()) == [FILES[0]]
    data = bytearray(buf.getvalue())
    data[512 + 156] = ord("S")  # the member becomes a GNU sparse file
    header = data[512:1024]
    data[512 + 148:512 + 156] = b"%06o\0 " % (sum(header) - sum(header[148:156]) + 256)
    with pytest.raises(TarHeaderError, match="sparse"):
        _ours(bytes(data))


def test_a_failing_pipe_command_is_a_record_not_an_exception(tmp_path):
    from megatron_vlm.data.shard_reader import read_shard

    missing = read_shard(f"pipe:cat {tmp_path}/missing.tar")
    (rec,) = list(missing)
    assert rec.error_kind == "open_failed" and "exit" in rec.error
    good = tmp_path / "good.tar"
    good.write_bytes(_archive(tarfile.USTAR_FORMAT, with_dir=False,
                              files=[("a.json", b"{}"), ("b.json", b"{}")]))
    # The command writes a whole tar and then fails (a download that died at a block boundary).
    recs = list(read_shard(f"pipe:sh -c 'cat {good}; exit 3'"))
    assert [(r.key, r.error_kind) for r in recs] == [("a", None), ("b", "truncated")]
    assert "exit 3" in recs[1].error
