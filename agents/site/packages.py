"""The site's cache of code packages: fetched from the control plane once, verified against
their SHA-256 before any worker starts in them, kept under the site's data dir."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from scheduler.client import ApiClient
from scheduler.packaging import SHA256_RE, verify

log = logging.getLogger(__name__)


class PackageCache:
    def __init__(self, client: ApiClient, root: Path) -> None:
        self.client = client
        self.root = root

    def ensure(self, sha256: str) -> Path:
        """The local path of the verified zip; downloads it first if needed.

        Raises ``PackageError`` if the bytes do not match the digest, ``ApiError`` or
        ``ConnectionError`` if it cannot be fetched."""
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a SHA-256 digest: {sha256!r}")
        path = self.root / f"{sha256}.zip"
        if path.is_file():
            return path
        data = self.client.download_package(sha256)
        verify(data, sha256)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a half-written zip is never seen as the package
        log.info("package %s fetched (%d bytes)", sha256[:12], len(data))
        return path
