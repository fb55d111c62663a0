"""One storage root for datasets and runs: a local directory or an ``s3://bucket/prefix``.

``Storage`` is the one abstraction: a validated, picklable value (root, endpoint, region; only
these three fields are pickled into Ray tasks and checkpoints) with the operations built on it. It
gives a pyarrow filesystem and scheme-less paths for Ray Data (``filesystem`` + ``path``, or
``pyarrow_fs_and_path``), an fsspec filesystem where a library needs one (``fsspec``), and the few
file operations the pipelines use. Every ``rel`` argument is relative to the root and
``/``-separated; build it with ``join``.

Credentials come only from the environment of each process (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``; or the AWS default chain: profile, web identity,
instance role). They are never passed as arguments, never stored in a config and never logged, so
they are not pickled into Ray tasks either: on a cluster give every node the same environment
(``runtime_env={"env_vars": ...}`` or an IAM role). pyarrow ignores ``AWS_ENDPOINT_URL``; the
endpoint is always passed explicitly from ``Storage.s3_endpoint``.

Atomicity: ``write_bytes_atomic``/``atomic_writer`` publish a file whole or not at all. Locally:
a temporary file in the target directory, fsync, ``os.replace``. On S3: the bytes are staged in a
local temporary file and uploaded only after the writer finished without error (an S3 object
appears whole on completion of its PUT or multipart upload).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_COPY_CHUNK = 8 << 20


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once per process
    os.umask(mask)
    return mask


def join(*parts: str) -> str:
    """Join relative path parts with ``/``, dropping empty parts and duplicate slashes."""
    return "/".join(piece for part in parts for piece in part.split("/") if piece)


@dataclass(frozen=True)
class FileEntry:
    """A file found by ``Storage.list``."""

    path: str
    """Path relative to the listed directory, ``/``-separated."""
    size: int
    """Size in bytes."""


def credentials_in_env() -> str | None:
    """Name the credential source the environment offers, or None; raises on a half-set pair."""
    key_id = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
    secret = bool(os.environ.get("AWS_SECRET_ACCESS_KEY"))
    if key_id != secret:
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise ValueError(
            f"{missing} is not set but its partner is: export both AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
        )
    if key_id:
        return "AWS_ACCESS_KEY_ID"
    for name in ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        if os.environ.get(name):
            return name
    return None


@dataclass(frozen=True)
class Storage:
    """The client of the one storage root where datasets and runs live (a local directory or an S3 prefix):
    paths, reads, atomic writes, listings. Picklable, so Ray tasks and actors get it as an argument."""

    root: str
    """A local directory (absolute or relative) or ``s3://bucket/prefix``."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (``http://127.0.0.1:9000``, MinIO, moto); ``None`` = AWS. Ignored for local roots."""
    s3_region: str = "us-east-1"
    """Region used to sign S3 requests."""

    def __post_init__(self) -> None:
        root = (self.root or "").strip()
        if not root:
            raise ValueError("storage root is empty: pass --storage DIR or --storage s3://bucket/prefix")
        if root.startswith("file://"):
            root = root[len("file://"):]
        if root.startswith("s3://"):
            bucket = root[len("s3://"):].split("/", 1)[0]
            if not _BUCKET_RE.match(bucket):
                raise ValueError(
                    f"storage root {root!r}: {bucket!r} is not a valid S3 bucket name "
                    "(3-63 characters a-z, 0-9, '.', '-'); use s3://bucket/prefix"
                )
            root = "s3://" + join(root[len("s3://"):])
        elif "://" in root:
            raise ValueError(
                f"storage root {root!r} has an unsupported scheme: use a local directory or "
                "s3://bucket/prefix"
            )
        else:
            root = os.path.abspath(os.path.expanduser(root))
        object.__setattr__(self, "root", root)
        if self.s3_endpoint is not None:
            endpoint = self.s3_endpoint.strip().rstrip("/")
            if not endpoint.startswith(("http://", "https://")):
                raise ValueError(
                    f"s3_endpoint {self.s3_endpoint!r} must start with http:// or https:// "
                    "(e.g. --s3-endpoint http://127.0.0.1:9000)"
                )
            object.__setattr__(self, "s3_endpoint", endpoint or None)
        if not self.s3_region.strip():
            raise ValueError("s3_region is empty: pass a region such as us-east-1")

    @property
    def is_s3(self) -> bool:
        """True for ``s3://`` roots."""
        return self.root.startswith("s3://")

    @property
    def bucket(self) -> str:
        """The bucket of an S3 root."""
        if not self.is_s3:
            raise ValueError(f"storage root {self.root!r} is local and has no bucket")
        return self.root[len("s3://"):].split("/", 1)[0]

    def child(self, *parts: str) -> Storage:
        """The config of a sub-root (same endpoint and region)."""
        return Storage(self.uri(*parts), self.s3_endpoint, self.s3_region)

    @staticmethod
    def join(*parts: str) -> str:
        """Join relative path parts with ``/`` (see the module-level ``join``)."""
        return join(*parts)

    def __getstate__(self) -> dict[str, Any]:
        # Only the three fields travel (to Ray tasks, into checkpoints); the filesystem is rebuilt.
        return {"root": self.root, "s3_endpoint": self.s3_endpoint, "s3_region": self.s3_region}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    # -- filesystems and paths ---------------------------------------------------------------------

    @cached_property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem (S3 with the configured endpoint, or local)."""
        if not self.is_s3:
            return pafs.LocalFileSystem()
        kwargs: dict[str, Any] = {"region": self.s3_region}
        endpoint = self.s3_endpoint
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kwargs)

    def fsspec(self) -> Any:
        """An fsspec filesystem for the root (``s3fs.S3FileSystem`` or local) for libraries that want one."""
        if not self.is_s3:
            import fsspec

            return fsspec.filesystem("file")
        import s3fs

        client_kwargs: dict[str, Any] = {"region_name": self.s3_region}
        if self.s3_endpoint:
            client_kwargs["endpoint_url"] = self.s3_endpoint
        return s3fs.S3FileSystem(client_kwargs=client_kwargs)

    def path(self, *parts: str) -> str:
        """Path for ``self.filesystem`` (no scheme): ``bucket/prefix/parts`` or ``/abs/root/parts``."""
        base = self.root[len("s3://"):] if self.is_s3 else self.root
        rel = join(*parts)
        if not rel:
            return base
        return f"{base.rstrip('/')}/{rel}"

    def pyarrow_fs_and_path(self, rel: str = "") -> tuple[pafs.FileSystem, str]:
        """``(filesystem, path)`` for APIs that take both (Ray Data readers, Ray Train storage_path)."""
        return self.filesystem, self.path(rel)

    def uri(self, *parts: str) -> str:
        """Full location with scheme for messages and manifests: ``s3://...`` or an absolute path."""
        return ("s3://" + self.path(*parts)) if self.is_s3 else self.path(*parts)

    # -- checks ------------------------------------------------------------------------------------

    def check_reachable(self) -> None:
        """Fail early with a clear message when the bucket, endpoint or credentials are wrong."""
        if not self.is_s3:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise NotADirectoryError(f"storage root {self.root} is a file: pass a directory")
            return
        source = credentials_in_env()
        bucket = self.bucket
        endpoint = self.s3_endpoint or "AWS (default endpoint)"
        try:
            info = self.filesystem.get_file_info(bucket)
        except OSError as err:
            text = str(err)
            if source is None:
                creds = ("no credentials in the environment: export AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or run on a node with an IAM role)")
            else:
                creds = f"credentials from {source} were used: check that they are valid for this bucket"
            if any(word in text.lower() for word in ("connect", "resolve", "timed out", "timeout")):
                raise ConnectionError(
                    f"cannot reach S3 endpoint {endpoint} for bucket {bucket!r}: {text}. "
                    "Fix --s3-endpoint or start the server"
                ) from None
            raise PermissionError(
                f"cannot access bucket {bucket!r} at endpoint {endpoint}: {text}; {creds}") from None
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(
                f"bucket {bucket!r} does not exist at endpoint {endpoint}: create it or fix --storage"
            )

    # -- reading -----------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        """Whether a file or directory exists at ``rel``."""
        return bool(self.filesystem.get_file_info(self.path(rel)).type != pafs.FileType.NotFound)

    def size(self, rel: str) -> int | None:
        """Size of the file at ``rel`` in bytes, None when absent."""
        info = self.filesystem.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            return None
        return int(info.size)

    def read_bytes(self, rel: str) -> bytes:
        """The whole content of ``rel``; FileNotFoundError names the full location."""
        try:
            with self.filesystem.open_input_stream(self.path(rel)) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(rel)} does not exist") from None
        except OSError as err:
            if "not found" in str(err).lower() or "no such file" in str(err).lower():
                raise FileNotFoundError(f"{self.uri(rel)} does not exist") from None
            raise

    def read_head(self, rel: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of ``rel`` (a ranged read on S3), for cheap header checks."""
        with self.filesystem.open_input_file(self.path(rel)) as handle:
            return bytes(handle.read(nbytes))

    # -- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic_writer(self, rel: str) -> Iterator[IO[bytes]]:
        """A binary file whose content is published at ``rel`` only if the block exits normally."""
        if not rel:
            raise ValueError("atomic_writer needs a file path relative to the storage root")
        if self.is_s3:
            with tempfile.TemporaryFile(prefix="secu-upload-") as tmp:
                yield tmp
                tmp.flush()
                tmp.seek(0)
                with self.filesystem.open_output_stream(self.path(rel)) as out:
                    shutil.copyfileobj(tmp, out, _COPY_CHUNK)
            return
        target = self.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target))
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; publish like open() would
            os.replace(tmp_path, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
            raise

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Publish ``data`` at ``rel`` whole or not at all."""
        with self.atomic_writer(rel) as handle:
            handle.write(data)

    def upload_file_atomic(self, rel: str, local_path: str) -> int:
        """Publish a local file at ``rel`` (rename when possible); returns its size in bytes."""
        size = os.path.getsize(local_path)
        if not self.is_s3:
            target = self.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.replace(local_path, target)
                return size
            except OSError:  # another device: fall back to copy + rename in the target directory
                pass
        with self.atomic_writer(rel) as out, open(local_path, "rb") as src:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
        return size

    def delete(self, rel: str) -> None:
        """Remove the file at ``rel`` if it exists."""
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self.path(rel))

    def list(self, rel: str = "", *, recursive: bool = False) -> builtins.list[FileEntry]:
        """Files under directory ``rel`` (sorted by path); an absent directory gives an empty list."""
        base = self.path(rel).rstrip("/")
        selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            relpath = info.path[len(base):].lstrip("/")
            out.append(FileEntry(relpath, int(info.size)))
        return sorted(out, key=lambda e: e.path)
