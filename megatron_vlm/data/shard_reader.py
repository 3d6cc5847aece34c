"""Read a tar shard as a sequence of raw samples, turning damage into error records.

A shard is opened from a local path (seekable: skipped members are not read) or from any URL
WebDataset's ``gopen`` accepts (``http(s)://``, ``pipe:...``, ``file:``). Members are grouped
into samples by key (consecutive members with the same key). Damage does not raise:

- a member whose data ends early (truncated tar) yields a ``RawSample`` with ``error`` set that
  names the member, and ends the shard (nothing after a truncation can be trusted);
- a damaged header likewise ends the shard with an error record;
- a sample without its ``.json`` member yields an error record.

Callers decide what to count and log; the reader itself never logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from braceexpand import braceexpand

from .schema import split_member_name
from .tar_stream import TarHeaderError, TarReader, TarTruncatedError, open_tar_stream


@dataclass
class RawSample:
    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # suffix -> bytes ("json", "m00.t00.png")
    error: str | None = None  # why the sample is unusable; names the member
    error_kind: str | None = None  # "truncated", "damaged_header", "missing_json", "open_failed"


def expand_urls(spec) -> list[str]:
    """A brace glob ('a-{000..009}.tar'), a list of them, or '::'-separated ones -> list of urls."""
    if isinstance(spec, str):
        spec = spec.split("::")
    urls: list[str] = []
    for s in spec:
        urls.extend(braceexpand(s))
    return urls


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _open_tar(url: str) -> TarReader:
    if _is_local(url) or url.startswith("file://"):
        path = url[len("file://") :] if url.startswith("file://") else url
        stream = open(path, "rb")
    else:
        import webdataset  # only needed for remote / pipe urls

        stream = webdataset.gopen(url, "rb")
    try:
        return open_tar_stream(stream)
    except BaseException:
        _close_quietly(stream)
        raise


def _close_quietly(stream) -> str | None:
    """Close; return why closing failed (a ``pipe:`` command's exit status is reported there)."""
    try:
        stream.close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def read_shard(url: str, skip_samples: int = 0, keep: Callable[[int], bool] | None = None) -> Iterator[RawSample]:
    """Yield the raw samples of one shard in file order.

    keep: optional predicate on a sample's index in the shard; samples it rejects are passed
    over (not yielded, data not read). skip_samples: number of leading *kept* samples (error
    records included) to pass over likewise. On a local file passed-over data is not even read
    (the reader seeks past it).
    """
    name = os.path.basename(url)
    try:
        tar = _open_tar(url)
    except OSError as exc:
        if skip_samples == 0:  # one record per visit, whichever samples the caller keeps
            yield RawSample(shard=name, key="", error=f"cannot open shard: {type(exc).__name__}: {exc}",
                            error_kind="open_failed")
        return
    index = 0  # index in the shard of the current sample
    kept = 0  # kept samples before the current one
    current: RawSample | None = None
    wanted = False  # is the current sample kept and past skip_samples?

    def finish(sample: RawSample) -> RawSample:
        if sample.error is None and "json" not in sample.members:
            sample.error = f"member {sample.key}.json missing"
            sample.error_kind = "missing_json"
        return sample

    members = iter(tar)
    try:
        while True:
            try:
                info = next(members, None)
            except (TarHeaderError, TarTruncatedError, OSError, EOFError) as exc:
                failed = _close_quietly(tar)  # a failed pipe command says why it gave no tar
                reason = f"{exc}; {failed}" if failed else str(exc)
                if current is None and index == 0:  # nothing readable: not a tar file at all
                    if skip_samples == 0:
                        yield RawSample(shard=name, key="", error=f"cannot open shard: not a tar archive ({reason})",
                                        error_kind="open_failed")
                    return
                where = f"after member {current.key}" if current else "at start"
                err = f"damaged tar header {where}: {reason}"
                if wanted:
                    current.error, current.error_kind = err, "damaged_header"
                    yield current
                return
            if info is None:
                break
            key, suffix = split_member_name(info.name)
            if current is None or key != current.key:
                if current is not None:
                    if wanted:
                        yield finish(current)
                    index += 1
                current = RawSample(shard=name, key=key)
                is_kept = keep is None or keep(index)
                wanted = is_kept and kept >= skip_samples
                kept += is_kept
            if not wanted or current.error is not None:
                continue
            try:
                current.members[suffix] = tar.read(info)
            except (TarTruncatedError, OSError, EOFError) as exc:
                current.error = f"member {info.name} truncated or unreadable: {exc}"
                current.error_kind = "truncated"
                yield current
                return
        # A pipe or download that fails at a block boundary looks like a clean end of the tar:
        # only closing it tells. The last sample is then not to be trusted.
        failed = _close_quietly(tar)
        if current is not None and wanted:
            if failed and current.error is None:
                current.error = f"shard stream failed after member {current.key}: {failed}"
                current.error_kind = "truncated"
            yield finish(current)
        elif failed and current is None and skip_samples == 0:
            yield RawSample(shard=name, key="", error=f"cannot open shard: {failed}", error_kind="open_failed")
    finally:
        _close_quietly(tar)
