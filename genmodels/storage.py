"""One object-store interface over local directories (``file://``) and S3 (``s3://``).

Everything that persists bytes (dataset snapshots, checkpoints, sample shards, manifests)
goes through :class:`Storage`, so a run moves from a laptop directory to S3/MinIO by
changing one URL. Keys are ``/``-separated paths relative to the storage root, validated
the same way on both backends so that a key that works locally also works on S3 and can
never escape its root.

S3 endpoints: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) is honoured by boto3 itself;
an explicit ``endpoint_url`` argument wins over it. Path-style addressing is forced because
local endpoints (MinIO, moto) have no per-bucket DNS names. Objects of
:attr:`S3Storage.multipart_threshold` bytes or more go up through boto3's transfer manager as
multipart uploads (beyond the 5 GB of one PUT); S3 shows them only once complete, so every write
stays atomic. A bucket lifecycle rule aborting incomplete multipart uploads after a day frees
the parts of a writer killed mid-upload.
"""

from __future__ import annotations

import abc
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

__all__ = [
    "FileStorage", "S3Storage", "Storage", "StorageError", "check_reachable", "json_bytes", "open_storage",
    "read_url", "split_url",
]

# Suffix of the temporary files FileStorage writes before renaming them into place; list()
# hides them so a concurrent reader never sees a half-written object.
_TMP_SUFFIX = ".genmodels-tmp"


class StorageError(RuntimeError):
    """The store cannot be used: unreachable endpoint, missing bucket, denied access..."""


def _check_key(key: str, *, what: str = "key", allow_empty: bool = False) -> str:
    """Normalize a relative key; reject anything that could escape the root or be ambiguous."""
    if not isinstance(key, str):
        raise TypeError(f"storage {what} must be a str, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    if not key:
        raise ValueError(f"storage {what} must not be empty")
    if key.startswith("/"):
        raise ValueError(f"storage {what} {key!r} must be relative (no leading '/')")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage {what} {key!r} must not contain backslashes or NUL bytes")
    parts = key.rstrip("/").split("/") if allow_empty else key.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"storage {what} {key!r} has an empty, '.' or '..' path segment")
    return key


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix and key else prefix or key


def json_bytes(obj: Any) -> bytes:
    """How every JSON object is stored: sorted keys and a fixed indent, so the same object always
    gives the same bytes (and sha256)."""
    return (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode("utf-8")


class Storage(abc.ABC):
    """A root in an object store; every key is relative to it."""

    url: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically: readers see the old object or the new one, never a mix."""

    @abc.abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False when it does. The object appears whole.
        Of two writers racing for one key exactly one succeeds: the store's own exclusive step."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read one object; a missing one raises FileNotFoundError naming its full URL."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under the root (recursive, sorted) that start with ``prefix`` (a string prefix)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; removing a missing one is not an error."""

    @abc.abstractmethod
    def child(self, prefix: str) -> "Storage":
        """The storage rooted at ``prefix`` under this root."""

    @abc.abstractmethod
    def url_for(self, key: str) -> str: ...

    @abc.abstractmethod
    def parent(self) -> "Storage | None":
        """The storage one level up (the bucket or filesystem root has none)."""

    @abc.abstractmethod
    def check_reachable(self) -> None:
        """Raise StorageError naming the URL and the cause unless the root can be used."""

    def sweep_temporaries(self, prefix: str = "", older_than_s: float = 900.0) -> int:
        """Remove what writers killed mid-write left under ``prefix`` and last touched more than
        ``older_than_s`` ago; how many were removed. Nothing here by default: an S3 object
        exists only once its upload completes (a lifecycle rule aborts the parts of a dead one)."""
        return 0

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json_bytes(obj))

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.url_for(key)}: not valid JSON ({exc})") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class FileStorage(Storage):
    """A local directory. The root is created on the first write, not before."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write_then_place(key, data, os.replace)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        def link(tmp: Path, path: Path) -> bool:
            try:
                os.link(tmp, path)  # fails if the name exists: the exclusive step
            except FileExistsError:
                return False
            return True

        return self._write_then_place(key, data, link)

    def _write_then_place(self, key: str, data: bytes, place: Callable[[Path, Path], Any]) -> Any:
        """Write ``data`` to a temporary file beside ``key``'s path, then ``place(tmp, path)`` it
        (a rename or a link: the object appears whole); what ``place`` returns. The temporary file
        never outlives the call; an OSError is a StorageError naming the URL."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Same directory as the target so placing it is a rename or a link, hence atomic. Not
            # named after the target: 48 more bytes would refuse a name of 208-255 bytes, which the
            # filesystem (and S3) take.
            tmp = path.with_name(f".{uuid.uuid4().hex}{_TMP_SUFFIX}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # a crash after placing it must not leave an empty file
                return place(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write {self.url_for(key)}: {exc.strerror or exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise FileNotFoundError(f"no such object: {self.url_for(key)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.url_for(key)}: {exc.strerror or exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix, what="prefix", allow_empty=True)
        # Walk only the directory the prefix pins down, not the whole root.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*head.split("/")) if head else self.root
        if not start.is_dir():
            if self.root.exists() and not self.root.is_dir():
                # Not "nothing here": every write would fail, and a reader (`genmodels status`)
                # would report an empty storage.
                raise StorageError(f"{self.url}: storage root exists but is not a directory")
            return []
        keys = []
        # Linked folders are listed like the others (a class folder of a dataset may be a link),
        # each real folder once: a link to an ancestor would otherwise never end.
        seen = {os.path.realpath(start)}
        for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
            fresh = []
            for name in dirnames:
                real = os.path.realpath(os.path.join(dirpath, name))
                if real not in seen:
                    seen.add(real)
                    fresh.append(name)
            dirnames[:] = fresh
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.endswith(_TMP_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def sweep_temporaries(self, prefix: str = "", older_than_s: float = 900.0) -> int:
        # A live write takes seconds from open to rename; one this old was cut off. Were it still
        # going, its rename fails (a StorageError) and nothing placed is touched.
        _check_key(prefix, what="prefix", allow_empty=True)
        start = self.root.joinpath(*prefix.rstrip("/").split("/")) if prefix else self.root
        deadline = time.time() - older_than_s
        removed = 0
        for dirpath, _, filenames in os.walk(start):
            for name in filenames:
                if not name.endswith(_TMP_SUFFIX):
                    continue
                path = Path(dirpath, name)
                try:
                    if path.lstat().st_mtime < deadline:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass  # placed or swept by another process meanwhile
                except OSError as exc:
                    raise StorageError(f"cannot remove {path.as_uri()}: {exc.strerror or exc}") from exc
        return removed

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except IsADirectoryError:
            pass  # a "directory" is not an object: nothing to delete
        except OSError as exc:
            raise StorageError(f"cannot delete {self.url_for(key)}: {exc.strerror or exc}") from exc

    def child(self, prefix: str) -> "FileStorage":
        prefix = _check_key(prefix.rstrip("/"), what="prefix")
        return FileStorage(self.root.joinpath(*prefix.split("/")))

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def parent(self) -> "FileStorage | None":
        return None if self.root.parent == self.root else FileStorage(self.root.parent)

    def check_reachable(self) -> None:
        # Side-effect free: the root itself may not exist yet (put_bytes creates it), but the
        # nearest existing ancestor must be a writable directory.
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        if probe == self.root and not probe.is_dir():
            raise StorageError(f"{self.url}: storage root exists but is not a directory")
        if not probe.is_dir():
            raise StorageError(f"{self.url}: cannot create the storage root: {probe} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(f"{self.url}: storage root is not writable ({probe} denies write access)")


class _S3Client:
    """A boto3 client created on first use and shared by a storage and its children.

    boto3 clients are thread-safe once built, but building one is not; the lock covers that.
    Pickling (Ray tasks, process pools) drops the client and the copy builds its own.
    """

    def __init__(self, endpoint_url: str | None, max_attempts: int | None) -> None:
        self.endpoint_url = endpoint_url
        self.max_attempts = max_attempts
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    import boto3
                    from botocore.config import Config

                    retries: dict[str, Any] = {"mode": "standard"}
                    if self.max_attempts is not None:
                        retries["max_attempts"] = self.max_attempts
                    config = Config(s3={"addressing_style": "path"}, retries=retries, connect_timeout=10)
                    # boto3 reads only AWS_DEFAULT_REGION; Ray Train's pyarrow filesystem takes
                    # AWS_REGION too (distributed.py), and both must talk to one region.
                    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
                    self._client = boto3.session.Session().client(
                        "s3", endpoint_url=self.endpoint_url, config=config, region_name=region
                    )
        return self._client

    @property
    def endpoint(self) -> str:
        """The endpoint actually used, for error messages (env-configured ones included)."""
        if self._client is not None:
            return self._client.meta.endpoint_url
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL", "the default AWS endpoint"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "max_attempts": self.max_attempts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["endpoint_url"], state["max_attempts"])  # type: ignore[misc]


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3 (AWS, MinIO, moto...)."""

    #: Keys per LIST request (S3 caps it at 1000); tests lower it to exercise pagination.
    list_page_size: int = 1000
    #: Objects of at least this many bytes go up as multipart uploads (one PUT is capped at 5 GB;
    #: a shard of a million RGB 64x64 images is ~12 GB). Below it, one PUT: one round trip.
    multipart_threshold: int = 64 * 1024**2
    #: Part size; raised for very large objects so that they need at most S3's 10,000 parts.
    multipart_chunksize: int = 64 * 1024**2
    #: Parts in flight per upload: bounds the memory an upload holds beside the object itself.
    multipart_concurrency: int = 4

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int | None = None,
        _client: _S3Client | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = _check_key(prefix, what="prefix") if prefix else ""
        self._s3 = _client or _S3Client(endpoint_url, max_attempts)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @property
    def client(self) -> Any:
        return self._s3.get()

    @property
    def endpoint_url(self) -> str | None:
        """The endpoint given explicitly (None: boto3's own resolution from AWS_* variables)."""
        return self._s3.endpoint_url

    def _key(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _error(self, exc: Exception, action: str, url: str) -> Exception:
        from botocore.exceptions import ClientError

        where = f"{url} (endpoint {self._s3.endpoint})"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code == "NoSuchBucket":
                return StorageError(f"cannot {action} {where}: no such bucket {self.bucket!r}")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"cannot {action} {where}: access denied ({code})")
            return StorageError(f"cannot {action} {where}: {code} {err.get('Message', '')}".rstrip())
        return StorageError(f"cannot {action} {where}: {exc}")

    def _call(self, action: str, url: str, method: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, action, url) from exc

    def put_bytes(self, key: str, data: bytes) -> None:
        # Atomic either way: a single PUT, or a multipart upload, which S3 makes visible only at
        # CompleteMultipartUpload (the transfer manager aborts the upload if a part fails).
        if len(data) < self.multipart_threshold:
            self._call("write", self.url_for(key), "put_object", Bucket=self.bucket, Key=self._key(key), Body=data)
            return
        self._put_multipart(key, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._error(exc, "write", self.url_for(key)) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "write", self.url_for(key)) from exc
        return True

    def _put_multipart(self, key: str, data: bytes | memoryview) -> None:
        import io

        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        max_parts = 10_000
        chunk = max(self.multipart_chunksize, -(-len(data) // max_parts))
        config = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk,
                                max_concurrency=self.multipart_concurrency)
        url = self.url_for(key)
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=config)
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, "write", url) from exc
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (BotoCoreError, ClientError)):
                raise self._error(cause, "write", url) from exc
            raise StorageError(f"cannot write {url} (endpoint {self._s3.endpoint}): {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        url = self.url_for(key)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return body.read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"no such object: {url}") from None
            raise self._error(exc, "read", url) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "read", url) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            # HEAD responses carry no body, so a missing bucket also reads as 404 here;
            # check_reachable is where a missing bucket is reported.
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(exc, "stat", self.url_for(key)) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "stat", self.url_for(key)) from exc

    def list(self, prefix: str = "") -> list[str]:
        _check_key(prefix, what="prefix", allow_empty=True)
        # The trailing "/" keeps root "a" from listing the keys of a sibling root "ab".
        root = f"{self.prefix}/" if self.prefix else ""
        from botocore.exceptions import BotoCoreError, ClientError

        keys = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix, PaginationConfig={"PageSize": self.list_page_size}
            )
            for page in pages:
                # A zero-byte key ending in "/" is a console's "folder": a folder, which a FileStorage
                # does not list either, and no valid key (get_bytes refuses it).
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", ())
                            if not (obj["Key"].endswith("/") and obj.get("Size") == 0))
        except (BotoCoreError, ClientError) as exc:
            raise self._error(exc, "list", _join(self.url, prefix)) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._call("delete", self.url_for(key), "delete_object", Bucket=self.bucket, Key=self._key(key))

    def child(self, prefix: str) -> "S3Storage":
        prefix = _check_key(prefix.rstrip("/"), what="prefix")
        return S3Storage(self.bucket, _join(self.prefix, prefix), _client=self._s3)

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def parent(self) -> "S3Storage | None":
        if not self.prefix:
            return None
        return S3Storage(self.bucket, self.prefix.rpartition("/")[0], _client=self._s3)

    def check_reachable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StorageError(
                    f"{self.url}: no such bucket {self.bucket!r} at endpoint {self._s3.endpoint}"
                ) from exc
            raise self._error(exc, "reach", self.url) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "reach", self.url) from exc


def open_storage(url: str | os.PathLike[str], **s3_options: Any) -> Storage:
    """``s3://bucket/prefix``, ``file:///abs/dir`` or a plain local path -> a Storage.

    ``s3_options`` (``endpoint_url``, ``max_attempts``) apply to s3:// URLs only.
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"storage URL must be a non-empty string, got {url!r}")
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{url!r}: an s3:// URL needs a bucket (s3://bucket/prefix)")
        return S3Storage(bucket, prefix, **s3_options)
    if s3_options:
        raise ValueError(f"{url!r}: options {sorted(s3_options)} apply to s3:// URLs only")
    if url.startswith("file:"):
        parts = urlsplit(url)
        if "?" in url or "#" in url:
            # urlsplit would drop them silently and place every object in the folder before them.
            raise ValueError(f"{url!r}: a file URL cannot hold '?' or '#' (a query or fragment); "
                             "percent-encode them in a folder name (%3F, %23)")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file URLs must be absolute (file:///abs/path), got host {parts.netloc!r}")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: file URLs must be absolute (file:///abs/path)")
        return FileStorage(path)
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "file") and not url.startswith(f"{scheme}:"):
        raise ValueError(f"{url!r}: write the scheme in lower case ({scheme}://...)")
    if scheme and len(scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(f"{url!r}: unsupported storage scheme {scheme!r}; use s3://, file:// or a local path")
    return FileStorage(url)


def split_url(url: str | os.PathLike[str], **s3_options: Any) -> tuple[Storage, str]:
    """A full object URL/path -> (storage of its parent, key of the object)."""
    url = os.fspath(url)
    stripped = url.rstrip("/")
    if url.startswith("s3://") and "/" not in stripped[len("s3://"):]:
        raise ValueError(f"{url!r} names a bucket, not an object")
    parent, sep, name = stripped.rpartition("/")
    if not sep or not name:
        return open_storage(".", **s3_options), stripped
    if parent in ("file:", "file://"):
        parent = "file:///"
    if url.startswith("file:"):
        name = unquote(name)  # as open_storage unquotes the parent: url_for quotes "a b" as "a%20b"
    return open_storage(parent or "/", **s3_options), name


def read_url(url: str | os.PathLike[str], **s3_options: Any) -> bytes:
    """Read one object given its full URL (``s3://b/k``, ``file:///p``) or local path."""
    storage, key = split_url(url, **s3_options)
    return storage.get_bytes(key)


def check_reachable(storage: Storage | str) -> None:
    """Fail fast, before training starts, if the store cannot be used."""
    if isinstance(storage, str):
        storage = open_storage(storage)
    storage.check_reachable()
