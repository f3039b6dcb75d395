"""Where a run directory lives: a POSIX folder, or a prefix in an object store (`s3://`, `gs://`).

One small interface serves the driver's records, the run lock, the report and the hosts' records of
injected failures: read, write a whole object, conditional create, list, delete, move, sizes and
times. Objects are only ever written whole; nothing is appended on an object store. Array data does
not pass through here: Orbax and TensorStore write checkpoints with their own drivers.

Object stores are reached through fsspec (`s3fs`, `gcsfs`), as Ray Train's storage and Orbax's
`etils.epath` do; both implement the conditional create (S3 `If-None-Match: *`, GCS
`ifGenerationMatch=0`). The standard variables point them anywhere S3 or GCS is spoken:
`AWS_ENDPOINT_URL` (MinIO, Ceph, R2, moto), `STORAGE_EMULATOR_HOST` (fake-gcs-server)."""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import pathlib
import shutil
import threading
import typing
from collections.abc import Mapping
from typing import Any

from jaxlaunch.contract.protocol import ConfigError

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                      "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
"""Where the stores are (not who may use them): passed on to the hosts of a cluster, whose nodes keep
their own credentials."""
SCHEMES = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs")}
"""URL scheme -> (the fsspec implementation it needs, the jaxlaunch extra that installs it)."""


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class Store(abc.ABC):
    """A run directory's objects, named by keys relative to its root ("checkpoints/10/x")."""

    url: str
    """The root, as a user would name it: an absolute path or a URL."""

    def join(self, *keys: str) -> str:
        """The full name (path or URL) of a key, for messages and for libraries that take one."""
        return "/".join([self.url.rstrip("/"), *(k.strip("/") for k in keys if k)])

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The whole object; FileNotFoundError if there is none."""

    @abc.abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Writes a whole object; readers see the old one or the new one, never part of one."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Writes the object only if none exists (one of several racing writers wins): whether it did."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Removes an object or everything under a prefix; nothing there is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """The names directly under a prefix (objects and sub-prefixes), sorted; [] if there are none."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (or anything under a prefix) is there."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Bytes of an object, or of everything under a prefix."""

    @abc.abstractmethod
    def modified(self, key: str) -> float | None:
        """When an object was last written (seconds since the epoch), or None if there is none."""

    @abc.abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Moves an object or a prefix: a rename on POSIX, a copy then a delete on an object store."""

    def makedirs(self) -> None:  # noqa: B027 - a default: stores without folders have none to make
        """Makes the root exist, where a store has folders."""

    @abc.abstractmethod
    def check(self) -> None:
        """ConfigError, in one line, when the store cannot be reached or written (no bucket, no
        credentials, a file where the folder should be)."""


def _fill(f: typing.BinaryIO, data: bytes) -> None:
    """Writes `data` to a new file and waits until it is on disk."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


class LocalStore(Store):
    """A folder on a POSIX filesystem (a local disk, or NFS shared by every node)."""

    def __init__(self, path: str | os.PathLike):
        self.root = pathlib.Path(path).absolute()
        self.url = str(self.root)

    def _p(self, key: str) -> pathlib.Path:
        return self.root / key if key else self.root

    def read(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    def _staged(self, key: str, data: bytes) -> tuple[pathlib.Path, pathlib.Path]:
        """The object's path (its folder made), and `data` written whole, on disk, under a name of this
        writer's own beside it (removed if that fails: a full disk leaves no leftover)."""
        path = self._p(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with tmp.open("wb") as f:
                _fill(f, data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path, tmp

    def write(self, key: str, data: bytes) -> None:
        path, tmp = self._staged(key, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a folder in the file's place: no leftover
            raise

    def create(self, key: str, data: bytes) -> bool:
        # Written whole under a name of its own, then linked into place (link fails if the name exists):
        # a reader never finds it empty, and a disk that fills leaves no empty object behind.
        path, tmp = self._staged(key, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return self._create_in_place(path, data)  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def _create_in_place(path: pathlib.Path, data: bytes) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            _fill(f, data)
        return True

    def append(self, key: str, data: bytes) -> None:
        """POSIX only: adds to a file, so that a local run keeps one events.jsonl to `tail -f`. A
        line torn by an earlier writer does not swallow the first line of this one."""
        path = self._p(key)
        with path.open("a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)

    def delete(self, key: str) -> None:
        path = self._p(key)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def list(self, prefix: str = "") -> list[str]:
        try:
            return sorted(p.name for p in self._p(prefix).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, key: str) -> bool:
        return self._p(key).exists()

    def size(self, key: str) -> int:
        path = self._p(key)
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def modified(self, key: str) -> float | None:
        try:
            return self._p(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def touch(self, key: str) -> None:
        os.utime(self._p(key))

    def move(self, src: str, dst: str) -> None:
        target = self._p(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._p(src).rename(target)

    def makedirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        p = self.root
        if p.is_symlink() and not p.exists():
            raise ConfigError(f"--run-dir {p} is a symbolic link to nothing (or a loop): choose another --run-dir")
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--run-dir {p} is a file, not a directory: choose another --run-dir")
        existing = p if p.exists() else next((a for a in p.parents if a.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--run-dir {p}: {existing} is not writable; choose a --run-dir you can write to")


class ObjectStore(Store):
    """A prefix in a bucket of S3 or GCS (or of anything that speaks their protocol), via fsspec."""

    def __init__(self, url: str, fs: Any | None = None):
        scheme, _, rest = url.partition("://")
        self.url = f"{scheme}://{rest.strip('/')}"
        self.scheme, self.prefix = scheme, rest.strip("/")
        self.bucket = self.prefix.split("/", 1)[0]
        self.fs = fs if fs is not None else filesystem(scheme)

    def _p(self, key: str) -> str:
        return f"{self.prefix}/{key.strip('/')}" if key else self.prefix

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._p(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)

    def create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def delete(self, key: str) -> None:
        path = self._p(key)
        with contextlib.suppress(FileNotFoundError):
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            else:
                self.fs.rm_file(path)

    def list(self, prefix: str = "") -> list[str]:
        try:
            found = self.fs.ls(self._p(prefix), detail=False)
        except FileNotFoundError:
            return []
        base = self._p(prefix).rstrip("/") + "/"
        return sorted({f[len(base):].split("/", 1)[0] for f in found if f.startswith(base)} - {""})

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._p(key))

    def size(self, key: str) -> int:
        return int(self.fs.du(self._p(key), total=True))

    def modified(self, key: str) -> float | None:
        try:
            return self.fs.modified(self._p(key)).timestamp()
        except FileNotFoundError:
            return None

    def move(self, src: str, dst: str) -> None:
        source, target = self._p(src), self._p(dst)
        objects = self.fs.find(source)
        if not objects:
            raise FileNotFoundError(f"{self.scheme}://{source}")
        for path in objects:
            self.fs.copy(path, target + path[len(source):])
        self.fs.rm(objects)

    def check(self) -> None:
        # The clients log each retry of an unreachable store as an error with its traceback (gcsfs: about
        # 50 lines): the one line below says it all.
        quiet = [logging.getLogger(name) for name in ("gcsfs", "s3fs", "aiobotocore", "botocore")]
        levels = [logger.level for logger in quiet]
        for logger in quiet:
            logger.setLevel(logging.CRITICAL)
        try:
            self.fs.ls(self.bucket, detail=False)
        except FileNotFoundError:
            raise ConfigError(f"--run-dir {self.url}: bucket {self.bucket} does not exist (or this account cannot "
                              f"see it); create it, or choose another --run-dir") from None
        except Exception as err:  # noqa: BLE001 - credentials and endpoints fail in many types: all said in one line
            raise ConfigError(f"--run-dir {self.url}: cannot list bucket {self.bucket} ({_one_line(err)}); "
                              f"{_CREDENTIALS[self.scheme]}") from None
        finally:
            for logger, level in zip(quiet, levels, strict=True):
                logger.setLevel(level)


_CREDENTIALS = {
    "s3": "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a store that "
          "is not AWS",
    "gs": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS, and "
          "STORAGE_EMULATOR_HOST for an emulator",
}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


_UNCACHED = {"skip_instance_cache": True, "use_listings_cache": False}
"""Other writers (the hosts, another launch) add objects at any time: every listing asks the store."""


def filesystem(scheme: str) -> Any:
    """The fsspec filesystem of a URL scheme, or ConfigError naming the extra that serves it."""
    if scheme not in SCHEMES:
        raise ConfigError(f"--run-dir {scheme}://...: jaxlaunch keeps runs on a path, s3:// or gs://, not "
                          f"{scheme}://")
    module, extra = SCHEMES[scheme]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST") if scheme == "gs" else None
    try:
        import fsspec

        __import__(module)
    except ImportError:
        raise ConfigError(f"--run-dir {scheme}://... needs {module}: pip install 'jaxlaunch[{extra}]'") from None
    if emulator:
        # gcsfs's default class (its experimental one, unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is
        # false when it is imported) asks a gRPC API that emulators lack for each bucket's type, a
        # minute each: the plain class serves an emulator. gcsfs reads the emulator's variable too,
        # but then asks for credentials an emulator has no use for.
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon", endpoint_url=_with_scheme(emulator), **_UNCACHED)
    return fsspec.filesystem(scheme, **_UNCACHED)


def _with_scheme(host: str) -> str:
    return host if "://" in host else f"http://{host}"


def open_store(location: str | os.PathLike) -> Store:
    """The store of a run directory: a URL's object store, or else a local folder."""
    if is_url(location):
        return ObjectStore(str(location))
    return LocalStore(location)


def endpoint_environment() -> dict[str, str]:
    """What a host process is given in its environment when it starts: the variables of
    ENDPOINT_VARIABLES that are set here, and what TensorStore and gcsfs need to follow a GCS
    emulator (`host_storage_environment`)."""
    return {**{k: os.environ[k] for k in ENDPOINT_VARIABLES if k in os.environ}, **host_storage_environment(os.environ)}


def host_storage_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """With a GCS emulator (STORAGE_EMULATOR_HOST): TensorStore's GCS driver reads its endpoint from
    TENSORSTORE_GCS_HTTP_URL alone (it has no spec member for it), and gcsfs's experimental class,
    which Orbax's paths would get, asks emulators for an API they lack. Given to a host process at its
    start; a value the user set is kept."""
    emulator = environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return {}
    wanted = {"TENSORSTORE_GCS_HTTP_URL": _with_scheme(emulator), "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return {k: environ.get(k, v) for k, v in wanted.items()}
