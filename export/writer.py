"""The model repository, write side: atomic versions with a manifest listing every file's sha256.

A version is staged in a hidden folder inside ``REPO/NAME/`` (same file system, so the final ``os.rename`` is
atomic) and renamed to ``REPO/NAME/N`` only once every file and the manifest are written and synced to disk. Readers
list only integer-named folders holding a manifest, so a half-written version is never visible. Staging folders left by
a killed export (``.staging-*``, ``.replaced-*``) are removed by the next export of that name once they are
STALE_SECONDS old.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from seqserve.server.repository import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_VERSION,  # the API's uint32: the server does not list a folder numbered above it
    NAME_PATTERN,
    Manifest,
    ModelRepository,
    RepositoryError,
    sha256_file,
)

log = logging.getLogger(__name__)

_STAGE_PREFIX = ".staging-"
_REPLACED_PREFIX = ".replaced-"
# A staging folder this old belongs to no running export (the slowest, a MarianMT with int8, takes minutes).
STALE_SECONDS = 6 * 3600


def check_version(version: int) -> int:
    """`version` if a repository version can carry it (1..MAX_VERSION); RepositoryError otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"version must be an integer from 1 to {MAX_VERSION} (the API's uint32), got {version!r}")
    return version


class VersionExists(RepositoryError):
    def __init__(self, path: Path):
        self.path = path
        super().__init__(
            f"{path} already exists; pass --force (force=True) to overwrite it, or choose another --version"
        )


def next_version(repository: str | os.PathLike, name: str) -> int:
    """One more than the highest complete version of `name` (1 for a new model)."""
    root = Path(repository)
    if not root.is_dir():
        return 1
    versions = [v for v in ModelRepository(root).versions(name) if v <= MAX_VERSION]  # others are no version
    if versions and versions[-1] == MAX_VERSION:
        raise RepositoryError(f"{root / name} holds version {MAX_VERSION}, the highest the API can carry; "
                              f"pass --version with a free number below it")
    return versions[-1] + 1 if versions else 1


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `folder` (recursively, POSIX relative paths), the manifest excluded."""
    entries = {}
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        # A version is self-contained: a link out of the folder would publish (and hash) a file that is not in it.
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise RepositoryError(f"{path} is a link; a version folder holds its own files only")
        if path.is_file() and rel != MANIFEST_FILE:
            entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def remove_stale_staging(model_dir: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove the `.staging-*` / `.replaced-*` folders of exports killed before they could clean up; returns them."""
    removed = []
    now = time.time()
    for path in model_dir.iterdir():
        if not path.name.startswith((_STAGE_PREFIX, _REPLACED_PREFIX)) or not path.is_dir() or path.is_symlink():
            continue
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        if age >= older_than:
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left %.1f hours ago by an export that did not finish", path, age / 3600)
            removed.append(path)
    return removed


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` and the folder entries themselves, so the rename publishes complete files."""
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        _fsync_path(path)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedVersion:
    """Write a version's files into `.dir`, then `commit(manifest)`; leaving the `with` block unfinished removes all.

    ::

        with StagedVersion(repo, "en-de-lstm") as stage:
            write files into stage.dir
            path = stage.commit(manifest_dict)   # fills name, version, files, format_version, created
    """

    def __init__(
        self, repository: str | os.PathLike, name: str, version: int | None = None, force: bool = False
    ) -> None:
        if not NAME_PATTERN.match(name):
            raise RepositoryError(f"model name {name!r} must match [a-z0-9][a-z0-9._-]*")
        if version is not None:
            check_version(version)
        self.repository = Path(repository)
        self.name = name
        self.requested_version = version
        self.force = force
        self.dir: Path | None = None
        self.path: Path | None = None  # the committed version folder
        self._created_model_dir = False  # removed again when the export fails (a new name leaves no empty folder)

    def __enter__(self) -> "StagedVersion":
        if self.repository.exists() and not self.repository.is_dir():
            raise RepositoryError(f"model repository {self.repository} is not a folder")
        model_dir = self.repository / self.name
        self._created_model_dir = not model_dir.exists()
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RepositoryError(f"cannot create {model_dir}: {e.strerror or e}") from None
        if not model_dir.is_dir():
            raise RepositoryError(f"{model_dir} is not a folder")
        remove_stale_staging(model_dir)
        # Fail before the (slow) export when the requested version is taken.
        if self.requested_version is not None and not self.force:
            target = model_dir / str(self.requested_version)
            if target.exists():
                raise VersionExists(target)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=model_dir))
        except OSError as e:
            raise RepositoryError(f"cannot write into {model_dir}: {e.strerror or e}") from None
        # mkdtemp makes the folder private (0700); a published version must be readable by the serving user,
        # which in a container is not the user that built the repository.
        self.dir.chmod(0o755)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.path is None and self._created_model_dir:
            try:
                (self.repository / self.name).rmdir()  # only when empty: another export may be writing there
            except OSError:
                pass

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Hash the staged files, write manifest.json and rename the folder into place; returns the version folder."""
        if self.dir is None:
            raise RepositoryError("StagedVersion.commit() must be called once, inside the with block")
        model_dir = self.dir.parent
        data = dict(manifest)
        data.update(format_version=FORMAT_VERSION, name=self.name, files=file_entries(self.dir))
        data.setdefault("created", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        for attempt in range(100):
            version = check_version(self.requested_version or next_version(self.repository, self.name) + attempt)
            data["version"] = version
            # Through the loader's own parser: never publish a manifest it rejects; write its canonical form.
            canonical = Manifest.from_dict(data, self.dir / MANIFEST_FILE).to_dict()
            _write_json(self.dir / MANIFEST_FILE, canonical)
            _fsync_tree(self.dir)
            target = model_dir / str(version)
            if target.exists():
                if self.requested_version is None:
                    continue  # another writer took this number
                if not self.force:
                    raise VersionExists(target)
                # Move the old version aside (atomic), move the new one in, then delete the old one.
                trash = Path(tempfile.mkdtemp(prefix=_REPLACED_PREFIX, dir=model_dir))
                os.rename(target, trash / "old")
                os.rename(self.dir, target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                try:
                    os.rename(self.dir, target)
                except OSError:  # created between the check and the rename
                    if self.requested_version is None:
                        continue
                    raise VersionExists(target) from None
            self.dir, self.path = None, target
            _fsync_path(model_dir)  # the rename itself
            log.info("wrote %s", target)
            return target
        raise RepositoryError(f"could not find a free version number for {self.name} in {model_dir}")


def _write_json(path: Path, data: Any) -> None:
    try:
        # allow_nan=False: Infinity and NaN are not JSON (RFC 8259); other readers of the manifest refuse them.
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except ValueError as e:
        raise RepositoryError(f"{path} would hold a number that is not finite ({e}); nothing was published") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
