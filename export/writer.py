"""The model repository, write side: atomic versions with a manifest listing every file's sha256.

A version is staged in a hidden folder inside ``REPO/NAME/`` (same file system, so the final ``os.rename`` is
atomic) and renamed to ``REPO/NAME/N`` only once every file and the manifest are written. Readers list only
integer-named folders holding a manifest, so a half-written version is never visible.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from seqserve.server.repository import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    NAME_PATTERN,
    Manifest,
    ModelRepository,
    RepositoryError,
    sha256_file,
)

log = logging.getLogger(__name__)

_STAGE_PREFIX = ".staging-"


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
    versions = ModelRepository(root).versions(name)
    return versions[-1] + 1 if versions else 1


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `folder` (recursively, POSIX relative paths), the manifest excluded."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST_FILE:
            entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


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
        if version is not None and version < 1:
            raise RepositoryError(f"version must be a positive integer, got {version}")
        self.repository = Path(repository)
        self.name = name
        self.requested_version = version
        self.force = force
        self.dir: Path | None = None
        self.path: Path | None = None  # the committed version folder

    def __enter__(self) -> "StagedVersion":
        model_dir = self.repository / self.name
        model_dir.mkdir(parents=True, exist_ok=True)
        # Fail before the (slow) export when the requested version is taken.
        if self.requested_version is not None and not self.force:
            target = model_dir / str(self.requested_version)
            if target.exists():
                raise VersionExists(target)
        self.dir = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=model_dir))
        # mkdtemp makes the folder private (0700); a published version must be readable by the serving user,
        # which in a container is not the user that built the repository.
        self.dir.chmod(0o755)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Hash the staged files, write manifest.json and rename the folder into place; returns the version folder."""
        if self.dir is None:
            raise RepositoryError("StagedVersion.commit() must be called once, inside the with block")
        model_dir = self.dir.parent
        data = dict(manifest)
        data.update(format_version=FORMAT_VERSION, name=self.name, files=file_entries(self.dir))
        data.setdefault("created", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        for attempt in range(100):
            version = self.requested_version or next_version(self.repository, self.name) + attempt
            data["version"] = version
            # Through the loader's own parser: never publish a manifest it rejects; write its canonical form.
            canonical = Manifest.from_dict(data, self.dir / MANIFEST_FILE).to_dict()
            _write_json(self.dir / MANIFEST_FILE, canonical)
            target = model_dir / str(version)
            if target.exists():
                if self.requested_version is None:
                    continue  # another writer took this number
                if not self.force:
                    raise VersionExists(target)
                # Move the old version aside (atomic), move the new one in, then delete the old one.
                trash = Path(tempfile.mkdtemp(prefix=".replaced-", dir=model_dir))
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
            log.info("wrote %s", target)
            return target
        raise RepositoryError(f"could not find a free version number for {self.name} in {model_dir}")


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
