"""Whether carried wheels install cleanly over the GPU machine's image.

`pip install --no-deps --upgrade` there leaves the image's packages with each carried version in its package's
place, and checks nothing. So the check is made here, on that environment: every carried package's requirements
must hold in it, no requirement of an image package on a carried package may break, and the project's own
requirements must hold. Markers are read for CPython 3.12 on Linux x86_64; extras are ignored.

Requirements come from a wheel's METADATA, or from PyPI's metadata file of the wheel pip would pick for that
Python (the `<wheel url>.metadata` of PEP 658: a few kB; where the index has none, the wheel's zip directory and
METADATA member, read by byte ranges: never the whole wheel), cached in .cache/gpu-metadata/.
An image package whose version was never read satisfies a requirement on its name alone; one with a version
specifier is reported as unverifiable, not as a failure.
"""

from __future__ import annotations

import io
import json
import os
import threading
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from email.parser import HeaderParser
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
METADATA_CACHE = ROOT / ".cache" / "gpu-metadata"
INDEX = "https://pypi.org/simple"
# The image's interpreter: CPython 3.12.3 on Linux x86_64, with a glibc of at least 2.28 (its torch is a
# manylinux_2_28 wheel); wheels needing a newer glibc than that are never chosen.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64",
                                                                             "manylinux1_x86_64"]
MARKERS = {"implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
           "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
           "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
           "python_version": "3.12", "sys_platform": "linux", "extra": ""}
TAGS = [*tags.cpython_tags((3, 12), abis=["cp312"], platforms=PLATFORMS),
        *tags.compatible_tags((3, 12), "cp312", platforms=PLATFORMS)]
TAG_RANK = {tag: rank for rank, tag in enumerate(TAGS)}  # pip's order of preference: lower is better


class Unreachable(Exception):
    """The index did not answer: the check cannot be made (not the same as a failed check)."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str | None  # None: an image package whose version was never read
    requires: tuple[str, ...] | None = None  # None: its requirements are not known
    source: str = "image"  # "image", "carried" or "project"


@dataclass
class Verdict:
    failures: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)  # broken, in an image package nothing imports
    notes: list[str] = field(default_factory=list)


def canon(name: str) -> str:
    return canonicalize_name(name)


def read_pins(path: Path) -> dict[str, str | None]:
    """`name==version` or `name` a line, `#` comments: {canonical name: version or None}."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canon(name)] = version.strip() or None
    return pins


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(MARKERS)


def environment(image: list[Package], carried: list[Package]) -> dict[str, Package]:
    """What the machine holds after the install: the image, each carried package in its package's place."""
    env = {p.name: p for p in image}
    env.update({p.name: p for p in carried})
    return env


def check(env: dict[str, Package], project: Package | None = None, unused: dict[str, str] | None = None) -> Verdict:
    """Every requirement that involves a carried package (or the project) against `env`. `unused`: image
    packages nothing on the machine will import ({name: why}); their broken requirements are reported apart."""
    verdict = Verdict()
    carried = {name for name, p in env.items() if p.source == "carried"}
    sources = [p for p in env.values() if p.requires is not None] + ([project] if project else [])
    for source in sources:
        who = f"{source.name} {source.version} ({source.source})"
        for line in source.requires:
            req = Requirement(line)
            name = canon(req.name)
            if not applies(req) or (source.source == "image" and name not in carried):
                continue  # the image's own requirements among themselves are the image's business
            target = env.get(name)
            if target is None:
                problem = f"{who} needs {req}: {name} is neither in the image nor carried"
            elif target.version is None:
                if req.specifier:
                    verdict.unverifiable.append(f"{who} needs {req}: the image's {name} version is not recorded")
                continue
            elif not req.specifier.contains(Version(target.version), prereleases=True):
                problem = f"{who} needs {req}, but {name} is {target.version} ({target.source})"
            else:
                continue
            if source.name in (unused or {}) and source.source == "image":
                verdict.accepted.append(f"{problem}: {unused[source.name]}")
            else:
                verdict.failures.append(problem)
    for p in env.values():
        if p.requires is None and (p.source == "carried" or p.version is not None):
            verdict.notes.append(f"{p.name} {p.version} ({p.source}): no metadata found, its requirements unchecked")
    return verdict


def kept_problems(requirements: list[tuple[str, Requirement]],
                  versions: dict[str, str | None]) -> list[tuple[str, str]]:
    """(library, what is wrong) for each requirement (who needs it, what) on a library the image keeps (`versions`:
    its version there, None where it has none) that this version does not meet. Markers: the image's Python."""
    problems = []
    for who, req in requirements:
        name = canon(req.name)
        if name not in versions or not applies(req):
            continue
        version = versions[name]
        if version is None:
            problems.append((name, f"{who} needs {req}, and the image has no {name}"))
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append((name, f"{who} needs {req}, and the image has {name} {version}"))
    return problems


def wheel_requires(path: Path) -> Package:
    """A carried wheel: its name, version and Requires-Dist, read from the wheel itself."""
    name, version, _, _ = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = HeaderParser().parsestr(wheel.read(meta).decode())
    return Package(canon(name), str(version), tuple(headers.get_all("Requires-Dist") or ()), "carried")


def _get(url: str, **headers: str) -> bytes | None:
    """The body, None on 404; Unreachable when the index does not answer. A byte range that comes back as the
    whole file is refused unread (a wheel can weigh a GB)."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if "Range" in headers and response.status != 206:
                raise Unreachable(f"{url}: the server sends no byte ranges")
            return response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise Unreachable(f"{url}: HTTP {err.code}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise Unreachable(f"{url}: {getattr(err, 'reason', err)}") from None


class _RemoteFile(io.RawIOBase):
    """A file on the index read by byte ranges, so that zipfile reads a wheel's METADATA without the wheel."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        end = min(self.pos + len(buffer), self.size)
        if end <= self.pos:
            return 0
        data = _get(self.url, Range=f"bytes={self.pos}-{end - 1}") or b""
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _remote_metadata(url: str, size: int) -> bytes | None:
    """A wheel's METADATA where the index has no metadata file for it: its zip directory and that one member,
    read by byte ranges (some hundred kB)."""
    with zipfile.ZipFile(io.BufferedReader(_RemoteFile(url, size), 1 << 18)) as wheel:
        meta = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        return wheel.read(meta[0]) if meta else None


def _best_wheel(files: list[dict], version: str) -> dict | None:
    """The file pip would install for the image's Python: the wheel of `version` with the best-ranked tag."""
    ranked = []
    for f in files:
        if not f["filename"].endswith(".whl") or f.get("yanked"):
            continue
        try:
            _, wheel_version, _, wheel_tags = parse_wheel_filename(f["filename"])
        except (InvalidWheelFilename, InvalidVersion):
            continue  # a name from before the wheel format was settled: never the version asked for
        ranks = [TAG_RANK[t] for t in wheel_tags if t in TAG_RANK]
        if wheel_version == Version(version) and ranks:
            ranked.append((min(ranks), f))
    return min(ranked, key=lambda r: r[0])[1] if ranked else None


def index_requires(name: str, version: str) -> dict:
    """{"file", "requires"} of name==version's wheel for the image's Python, from the index's metadata file;
    "requires" is None where no such wheel (or no metadata file) exists. Cached: a release never changes."""
    cached = METADATA_CACHE / f"{canon(name)}-{version}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    page = _get(f"{INDEX}/{canon(name)}/", Accept="application/vnd.pypi.simple.v1+json")
    best = _best_wheel(json.loads(page)["files"], version) if page else None
    meta = best and (_get(best["url"] + ".metadata") or _remote_metadata(best["url"], best["size"]))
    requires = (HeaderParser().parsestr(meta.decode()).get_all("Requires-Dist") or []) if meta else None
    found = {"file": best and best["filename"], "requires": requires}
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}")
    partial.write_text(json.dumps(found, indent=1))
    partial.replace(cached)  # whole or absent, whoever else is filling the cache
    return found


def with_index_requires(packages: list[Package]) -> list[Package]:
    """`packages`, each with a known version and no requirements yet given those the index has (8 at a time)."""
    todo = [p for p in packages if p.version is not None and p.requires is None]
    with ThreadPoolExecutor(8) as pool:
        found = dict(zip(todo, pool.map(lambda p: index_requires(p.name, p.version)["requires"], todo), strict=True))
    return [replace(p, requires=tuple(found[p])) if found.get(p) is not None else p for p in packages]
