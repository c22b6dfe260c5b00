"""A job's code, shipped with the job: the working directory as a reproducible zip.

``andromeda submit`` packs the spec's ``working_dir`` (files ``.gitignore`` excludes are
left out, as is ``.git``), uploads it to the control plane under the SHA-256 of its bytes,
and the job names that digest; the site fetches it, checks the digest, and hands the zip
to Ray as the workers' ``runtime_env`` working directory. The same tree always gives the
same bytes (sorted entries, fixed timestamps and permissions), so an unchanged tree is
uploaded once.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pathspec

DEFAULT_MAX_BYTES = 100 * 2**20
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class PackageError(Exception):
    """The directory cannot be packed (missing, too large); the message says what to do."""


@dataclass(frozen=True, slots=True)
class Package:
    data: bytes
    sha256: str
    files: int

    @property
    def size(self) -> int:
        return len(self.data)


def pack(root: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Package:
    """Zip ``root``, honouring every ``.gitignore`` in it; ``PackageError`` past ``max_bytes``."""
    if not root.is_dir():
        raise PackageError(f"working_dir {root} is not a directory")
    files = sorted(_included(root))
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for rel in files:
            path = root / rel
            total += path.stat().st_size
            if total > max_bytes * 4:  # even well-compressed, this will not fit
                raise _too_large(root, max_bytes, f"more than {4 * max_bytes} bytes of files")
            info = zipfile.ZipInfo(rel.as_posix(), date_time=_FIXED_TIME)
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    data = buf.getvalue()
    if len(data) > max_bytes:
        raise _too_large(root, max_bytes, f"{len(data)} bytes compressed")
    return Package(data=data, sha256=hashlib.sha256(data).hexdigest(), files=len(files))


def _too_large(root: Path, max_bytes: int, what: str) -> PackageError:
    return PackageError(
        f"working_dir {root} is too large to ship ({what}; the limit is {max_bytes} bytes): "
        "add what the job does not need (data sets, checkpoints, virtualenvs) to .gitignore"
    )


def _included(root: Path) -> list[Path]:
    """Paths relative to ``root`` of the files a ``git add`` would take, roughly: every
    ``.gitignore`` applies to its own folder and below; ``.git`` is never included."""
    out: list[Path] = []
    specs: list[tuple[Path, pathspec.PathSpec]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root)
        ignore_file = here / ".gitignore"
        if ignore_file.is_file():
            lines = ignore_file.read_text(errors="replace").splitlines()
            specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(lines)))
        active = [(base, spec) for base, spec in specs if _within(rel_dir, base)]
        keep = []
        for name in sorted(dirnames):
            rel = rel_dir / name
            if name == ".git" or _ignored(rel, active, is_dir=True) or (here / name).is_symlink():
                continue
            keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            rel = rel_dir / name
            path = here / name
            if path.is_symlink() or not path.is_file() or _ignored(rel, active, is_dir=False):
                continue
            out.append(rel)
    return out


def _within(path: Path, base: Path) -> bool:
    return base == Path(".") or path == base or base in path.parents


def _ignored(rel: Path, specs: list[tuple[Path, pathspec.PathSpec]], *, is_dir: bool) -> bool:
    for base, spec in specs:
        sub = rel.relative_to(base) if base != Path(".") else rel
        text = sub.as_posix() + ("/" if is_dir else "")
        if spec.match_file(text):
            return True
    return False


def verify(data: bytes, sha256: str) -> None:
    """Raise ``PackageError`` unless ``data`` is a zip whose SHA-256 is ``sha256``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise PackageError(f"package digest mismatch: expected {sha256}, got {digest}")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise PackageError(f"package {sha256} is not a zip archive")
