"""Content hashes of the files a stage reads, so that a changed input is never served an old output.

A file's SHA-256 is remembered with its size, mtime (ns) and inode in `.kd/content-hashes.json`;
it is read again only when one of those changed. That is how DVC keeps its own hashes cheap:
an unchanged folder of 60,000 images costs one `stat` per file, a changed one rehashes only
the files that changed. A folder's hash covers every file's relative path and content.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from engine.atomic import save_json
from engine.errors import KDError

_LOCK = threading.Lock()
CACHE_FILE = "content-hashes.json"


class ContentHasher:
    def __init__(self, state_dir: Path):
        self.path = state_dir / CACHE_FILE
        self._memo: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.path.read_text())
            except (OSError, ValueError):  # absent, or a torn write by a killed process: start afresh
                self._memo = {}
        return self._memo

    def _file(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        memo = self._load()
        known = memo.get(str(path))
        if known and known[:3] == stamp:
            return known[3]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        memo[str(path)] = [*stamp, h.hexdigest()]
        self._dirty = True
        return h.hexdigest()

    def hash(self, path: Path) -> str:
        """The content hash of a file, or of a folder's files (names and contents)."""
        path = Path(path).resolve()
        with _LOCK:
            try:
                if path.is_file():
                    return self._file(path)[:16]
                if not path.is_dir():
                    raise KDError(f"{path}: input not found")
                h = hashlib.sha256()
                for f in sorted(p for p in path.rglob("*") if p.is_file()):
                    h.update(f"{f.relative_to(path)}\0{self._file(f)}\n".encode())
                return h.hexdigest()[:16]
            finally:
                self._save()

    def _save(self) -> None:
        if self._dirty:
            try:
                save_json(self._memo, self.path)
            except OSError:  # a read-only project still runs; hashes are recomputed next time
                pass
            self._dirty = False


_HASHERS: dict[str, ContentHasher] = {}


def content_hash(path: Path, state_dir: Path) -> str:
    return _HASHERS.setdefault(str(state_dir), ContentHasher(state_dir)).hash(path)


def code_hash(root: Path, paths: list[str]) -> str:
    """The project's own code a stage runs (the .py files only, so caches and notes do not count)."""
    h = hashlib.sha256()
    for rel in paths:
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]

