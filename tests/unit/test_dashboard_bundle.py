"""The committed dashboard bundle (server/static) was built from the committed sources (ui/).

ui/manifest.mjs writes server/static/manifest.json after `vite build`; this recomputes the same
digest — sha256 over "<path>\\0<sha256 of the file>\\n" for each source path in sorted order — and
the hash of every built file. A change to ui/ without `make ui` (or a hand edit of the bundle) fails.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "ui"
STATIC = ROOT / "server" / "static"
SOURCES = ["index.html", "docs.html", "manifest.mjs", "package.json", "package-lock.json", "vite.config.js", "src"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path, entries: list[str]) -> list[str]:
    out: list[str] = []
    for entry in entries:
        path = root / entry
        out += ([p.relative_to(root).as_posix() for p in path.rglob("*") if p.is_file()] if path.is_dir()
                else [entry])
    return sorted(out)


def _manifest() -> dict:
    return json.loads((STATIC / "manifest.json").read_text())


def test_the_bundle_was_built_from_the_committed_sources() -> None:
    paths = _files(UI, SOURCES)
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\0{_sha(UI / path)}\n".encode())
    manifest = _manifest()
    assert manifest["sources"] == paths
    assert manifest["sources_sha256"] == digest.hexdigest(), "ui/ changed since the bundle was built: run `make ui`"


def test_every_built_file_is_the_one_the_manifest_lists() -> None:
    manifest = _manifest()
    built = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.rglob("*")
                   if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == built
    for name, sha in manifest["files"].items():
        assert _sha(STATIC / name) == sha, f"{name} differs from what the build wrote"


def test_the_page_loads_only_bundled_files_and_has_no_inline_script() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/assets/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert not re.search(r"\sstyle=", html), "inline style"
    for ref in re.findall(r'(?:src|href)="(/assets/[^"]+)"', html):
        assert (STATIC / ref.lstrip("/")).is_file(), ref
