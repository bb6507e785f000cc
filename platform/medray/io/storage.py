"""One way to open a URI: an absolute or relative local path, ``s3://bucket/key``, or (to read) one
DICOMweb instance, ``dicomweb://host:port/root/studies/…/series/…/instances/…`` (medray.io.pacs).

S3-compatible on-premise stores (MinIO, Ceph) are reached through the AWS SDKs' own standard
variables ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, so boto3, pyarrow and Ray all agree on
the endpoint. The config's ``s3.endpoint_url`` / ``s3.region`` (``configure_s3``) set those same
variables in the driver before Ray starts, so local Ray workers inherit them; on a remote cluster,
put them in the job's runtime environment (``env_vars``) as well.

Every S3 client here (pyarrow's ``S3FileSystem``, boto3) waits at most ``s3.connect_timeout`` to
connect and ``s3.read_timeout`` for each answer, and tries a request ``s3.attempts`` times, so a
store that accepts connections but never answers fails in seconds, not minutes. The settings travel
to Ray workers the same way as the endpoint: as ``MEDRAY_S3_*`` variables set before Ray starts.
Such a failure becomes ``StoreUnreachable``, one line naming the endpoint and these settings.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from medray.errors import MedrayError

S3 = "s3://"
CONNECT_TIMEOUT, READ_TIMEOUT, ATTEMPTS = 5.0, 10.0, 2  # defaults: a dead store fails within ~25 s
_TIMEOUTS = {"connect_timeout": "MEDRAY_S3_CONNECT_TIMEOUT", "read_timeout": "MEDRAY_S3_READ_TIMEOUT", "attempts": "MEDRAY_S3_ATTEMPTS"}
# How the AWS C++ SDK under pyarrow reports a store it could not reach or that did not answer.
_UNREACHABLE = re.compile(r"curlCode: (6|7|28)\b|NETWORK_CONNECTION|Timeout was reached|Couldn't connect", re.IGNORECASE)


class StoreUnreachable(MedrayError, ConnectionError):
    """An S3 endpoint that did not connect or answer within the configured timeouts."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3)


def is_remote(uri: str) -> bool:
    """An ``s3://`` or ``dicomweb(s)://`` URI: never a path relative to anything."""
    from medray.io.dicomweb import is_dicomweb

    return is_s3(uri) or is_dicomweb(uri)


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray workers run in other directories); S3 and DICOMweb URIs stay."""
    uri = str(uri)
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_s3(uri) else os.path.join(uri, *parts)


def parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if is_s3(uri) else os.path.dirname(absolute(uri))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def configure_s3(
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    attempts: int | None = None,
) -> None:
    """Point every S3 client (pyarrow here, boto3, Ray's readers) at an S3-compatible store, with one set
    of timeouts. Given values override the environment; ``None`` leaves it as it is."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if region:
        os.environ["AWS_REGION"] = region
    for name, value in (("connect_timeout", connect_timeout), ("read_timeout", read_timeout), ("attempts", attempts)):
        if value is not None:
            os.environ[_TIMEOUTS[name]] = str(value)


def s3_timeouts() -> tuple[float, float, int]:
    """(connect timeout in s, read timeout in s, attempts per request) that every S3 client uses."""
    return (
        float(os.environ.get(_TIMEOUTS["connect_timeout"], CONNECT_TIMEOUT)),
        float(os.environ.get(_TIMEOUTS["read_timeout"], READ_TIMEOUT)),
        int(os.environ.get(_TIMEOUTS["attempts"], ATTEMPTS)),
    )


def _unreachable(err: BaseException) -> StoreUnreachable:
    connect, read, attempts = s3_timeouts()
    endpoint = s3_endpoint() or "AWS S3 (no s3.endpoint_url set)"
    return StoreUnreachable(
        f"S3 endpoint {endpoint} did not connect or answer (s3.attempts {attempts}, s3.connect_timeout {connect:g} s, "
        f"s3.read_timeout {read:g} s): check that it is up and that s3.endpoint_url is right, or raise s3.read_timeout / s3.attempts"
    )


def as_store_error(err: BaseException) -> StoreUnreachable | None:
    """``err`` as a ``StoreUnreachable`` when it says an S3 endpoint could not be reached, else None."""
    if isinstance(err, StoreUnreachable):
        return err
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    if isinstance(err, (BotoConnectionError, HTTPClientError)) or (isinstance(err, OSError) and _UNREACHABLE.search(str(err))):
        return _unreachable(err)
    return None


@contextlib.contextmanager
def reaching(uri: str):
    """Around S3 calls: a store that does not answer becomes one ``StoreUnreachable`` line."""
    try:
        yield
    except Exception as err:
        translated = as_store_error(err) if is_s3(uri) else None
        if translated is None or translated is err:
            raise
        raise translated from None


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, timeouts: tuple[float, float, int]) -> pafs.S3FileSystem:
    connect, read, attempts = timeouts
    kwargs = {"connect_timeout": connect, "request_timeout": read, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs |= {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)  # no region: the AWS SDK resolves it (AWS_DEFAULT_REGION, the profile, ...)


@functools.lru_cache(maxsize=8)
def _boto3_client(endpoint: str | None, region: str | None, timeouts: tuple[float, float, int]):
    import boto3
    from botocore.config import Config

    connect, read, attempts = timeouts
    config = Config(connect_timeout=connect, read_timeout=read, retries={"total_max_attempts": attempts, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def s3_client():
    """A boto3 S3 client with the same endpoint, region and timeouts as ``filesystem``'s."""
    return _boto3_client(s3_endpoint(), os.environ.get("AWS_REGION"), s3_timeouts())


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (what Ray's readers take)."""
    uri = str(uri)
    if is_s3(uri):
        fs = _s3_filesystem(s3_endpoint(), os.environ.get("AWS_REGION"), s3_timeouts())  # s3.region lands in AWS_REGION
        return fs, uri[len(S3):]
    return pafs.LocalFileSystem(), absolute(uri)


class NotRegularFileError(OSError):
    """A local path that is not a regular file (a FIFO, a socket, a device, a folder): never read."""


def file_kind(mode: int) -> str:
    """What an ``os.stat`` mode stands for, in words (for the reason a file is not read)."""
    kinds = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "regular file"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "special file")


def _read_local(path: str) -> bytes:
    # Checked on the open file, not before opening it: a path listed as a file may have become a
    # FIFO since. O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # a FIFO or socket would block, a device such as /dev/zero never ends
            raise NotRegularFileError(f"{path}: a {file_kind(mode)}, not a regular file: not read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes:
    """The bytes of a regular file, an S3 object or a DICOMweb instance (one WADO-RS request); anything else
    locally is a ``NotRegularFileError``."""
    from medray.io.dicomweb import is_dicomweb

    if is_dicomweb(uri):
        from medray.io.pacs import read_instance

        return read_instance(uri)
    if not is_s3(uri):
        return _read_local(absolute(uri))
    fs, path = filesystem(uri)
    with reaching(uri), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
    with reaching(uri), fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with reaching(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    with reaching(uri):
        fs.create_dir(path, recursive=True)


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    with reaching(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    prefix = S3 if is_s3(uri) else ""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    return sorted(
        prefix + info.path
        for info in infos
        if info.type == pafs.FileType.File and (exts is None or info.path.lower().endswith(exts))
    )


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def iter_files(uri: str, extensions: tuple[str, ...] | None = None) -> Iterator[str]:
    """Like ``list_files``, but yielded as the listing goes, in a stable order (S3: key order, local:
    sorted walk), so a prefix with millions of keys is consumed page by page, never held whole."""
    exts = tuple(e.lower() for e in extensions) if extensions else None
    wanted = (lambda name: name.lower().endswith(exts)) if exts else (lambda name: True)
    uri = str(uri)
    if is_s3(uri):
        bucket, _, prefix = uri[len(S3):].partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        with reaching(uri):
            for page in pages:
                for item in page.get("Contents", []):
                    if not item["Key"].endswith("/") and wanted(item["Key"]):
                        yield f"{S3}{bucket}/{item['Key']}"
        return
    from medray.io.listing import walk  # the one local walk (regular files only, no folder links); it builds on this module

    yield from (entry.uri for entry in walk(uri, extensions) if not entry.skipped)


TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # write_atomic's temporary files


def write_atomic(uri: str, data: bytes) -> None:
    """Readers see the whole file or none of it: locally a hidden temporary file renamed into place;
    on S3 a single PUT, which S3 makes visible only once complete. A process killed mid-write leaves
    its temporary file behind: ``remove_temporaries`` clears them before the folder is written again."""
    if is_s3(uri):
        write_bytes(uri, data)
        return
    path = absolute(uri)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def remove_temporaries(uri: str) -> int:
    """Remove the temporary files that killed writers left in the local folder ``uri`` (not below
    it); returns how many. Only for a folder that no other process is writing to."""
    if is_s3(uri) or not os.path.isdir(absolute(uri)):
        return 0  # S3 PUTs leave nothing behind
    with os.scandir(absolute(uri)) as entries:
        stale = [e.path for e in entries if TEMPORARY.match(e.name) and e.is_file(follow_symlinks=False)]
    for path in stale:
        os.remove(path)
    return len(stale)
