"""Fetch the pinned hnswlib source distribution from the package index and unpack its headers.

hnswlib is a dependency, not vendored code: the build downloads the sdist by package name from
the configured index (PIP_INDEX_URL or PyPI's simple API), verifies its sha256, and extracts the
header-only C++ library. Usage: fetch_hnswlib.py VERSION SHA256 DEST_DIR
"""
from __future__ import annotations

import hashlib
import html.parser
import io
import os
import sys
import tarfile
import urllib.parse
import urllib.request


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _fail(msg: str) -> None:
    sys.stderr.write(f"\n*** tailrank build: cannot get hnswlib headers: {msg}\n"
                     "*** The build needs the hnswlib sdist from the package index (network to PyPI),\n"
                     "*** or set TAILRANK_HNSWLIB_SDIST=/path/to/hnswlib-<version>.tar.gz.\n\n")
    sys.exit(1)


def _download(version: str) -> bytes:
    local = os.environ.get("TAILRANK_HNSWLIB_SDIST")
    if local:
        with open(local, "rb") as f:
            return f.read()
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/hnswlib/"
    name = f"hnswlib-{version}.tar.gz"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as r:
            parser = _Links()
            parser.feed(r.read().decode("utf-8", "replace"))
        hrefs = [h for h in parser.links if urllib.parse.urlparse(h).path.endswith("/" + name)
                 or h.split("#")[0].endswith(name)]
        if not hrefs:
            _fail(f"{name} is not listed at {page_url}")
        url = urllib.parse.urljoin(page_url, hrefs[0].split("#")[0])
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.read()
    except OSError as e:  # URLError is an OSError
        _fail(f"download failed ({e})")
    raise AssertionError  # unreachable


def main() -> None:
    if len(sys.argv) != 4:
        _fail("usage: fetch_hnswlib.py VERSION SHA256 DEST_DIR")
    version, sha, dest = sys.argv[1:]
    stamp = os.path.join(dest, ".sha256")
    if os.path.exists(stamp) and open(stamp).read().strip() == sha:
        return
    blob = _download(version)
    got = hashlib.sha256(blob).hexdigest()
    if got != sha:
        _fail(f"sha256 mismatch for hnswlib-{version}.tar.gz: expected {sha}, got {got}")
    out = os.path.join(dest, "hnswlib")
    os.makedirs(out, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and "/hnswlib/" in m.name and m.name.endswith(".h")]
        if not members:
            _fail("no hnswlib/*.h headers inside the sdist")
        for m in members:
            data = tar.extractfile(m)
            assert data is not None
            with open(os.path.join(out, os.path.basename(m.name)), "wb") as f:
                f.write(data.read())
    with open(stamp, "w") as f:
        f.write(sha + "\n")


if __name__ == "__main__":
    main()
