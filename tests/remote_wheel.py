"""Reads single files out of a wheel on PyPI without downloading the wheel.

A wheel is a zip archive: its table of contents (the central directory) sits at the end of the
file, and each member is a local header followed by its deflated bytes. HTTP Range requests
fetch the end record, the central directory, and then each wanted member, so reading twenty
source files of the ~330 MB CUDA vLLM wheel moves about a megabyte. Each member is checked
against its CRC-32 and against the sha256 the wheel's own RECORD lists, so a cached or
fetched file is the pinned release's file or an error.

Fetched files are cached under ``~/.cache/megatron_prime/wheels/<wheel file name>/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

CACHE = Path.home() / ".cache" / "megatron_prime" / "wheels"
TIMEOUT_S = 30
_END_RECORD = struct.Struct("<4s4H2LH")  # end of central directory, without the comment
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header


def _get(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes ``start..end`` (inclusive; negative start: the last -start bytes)."""
    request = urllib.request.Request(url, headers={"User-Agent": "megatron_prime-tests"})
    if start is not None:
        # "bytes=-N" asks for the last N bytes.
        request.add_header("Range", f"bytes={start}" if start < 0 else f"bytes={start}-{end}")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        if start is not None and response.status != 206:
            raise OSError(f"{url}: the server ignored the Range request (HTTP {response.status})")
        return response.read()


class NotOnPyPI(LookupError):
    """PyPI answered, and has no such wheel: a wrong pin, not a network failure."""


class DamagedWheel(ValueError):
    """The bytes read are not the wheel's (CRC, RECORD hash or zip structure): a failure,
    never a reason to skip (network failures are ``OSError``)."""


def wheel_url(project: str, version: str, platform_tag: str = "manylinux_2_28_x86_64") -> tuple[str, str]:
    """(URL, file name) of ``project==version``'s wheel for ``platform_tag``, from PyPI's JSON
    API: the release's own endpoint, else the project's (some mirrors serve only that).
    Cached, so that a machine which fetched the files once reads them offline."""
    cached = CACHE / f"{project}-{version}-{platform_tag}.url"
    if cached.exists():
        url, filename = cached.read_text().split()
        return url, filename
    errors, answered = [], False
    release = f"https://pypi.org/pypi/{project}/{version}/json"
    for endpoint in (release, f"https://pypi.org/pypi/{project}/json"):
        try:
            data = json.loads(_get(endpoint))
        except urllib.error.HTTPError as error:  # PyPI answered: no such page
            errors.append(f"{endpoint}: HTTP {error.code}")
            answered = True
            continue
        except OSError as error:
            errors.append(f"{endpoint}: {error}")
            continue
        answered = True
        files = data["urls"] if endpoint == release else data.get("releases", {}).get(version, [])
        for file in files:
            if file["filename"].endswith(f"{platform_tag}.whl"):
                url = urljoin(endpoint, file["url"])  # a mirror may answer with relative URLs
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(f"{url} {file['filename']}")
                return url, file["filename"]
        errors.append(f"{endpoint}: no {platform_tag} wheel for {project}=={version}")
    if answered:
        raise NotOnPyPI("; ".join(errors))
    raise OSError("; ".join(errors))  # PyPI unreachable


@dataclass(frozen=True)
class Member:
    name: str
    method: int  # 0 stored, 8 deflated
    crc: int
    compressed_size: int
    size: int
    header_offset: int


class RemoteWheel:
    """Members of the wheel at ``url`` by name (``read``), fetched lazily by byte range."""

    def __init__(self, url: str, filename: str):
        self.url, self.filename = url, filename
        self.cache = CACHE / filename
        self._members: dict[str, Member] | None = None
        self._record: dict[str, str] | None = None

    def members(self) -> dict[str, Member]:
        """The central directory (fetched once per wheel)."""
        if self._members is None:
            tail = _get(self.url, -(_END_RECORD.size + 65535))  # the end record + a max comment
            at = tail.rfind(b"PK\x05\x06")
            if at < 0:
                raise DamagedWheel(f"{self.filename}: no zip end record in its last 64 KiB")
            _, _, _, _, count, size, offset, _ = _END_RECORD.unpack_from(tail, at)
            if count == 0xFFFF or offset == 0xFFFFFFFF:
                raise DamagedWheel(f"{self.filename}: a zip64 archive (not read by this test helper)")
            directory = _get(self.url, offset, offset + size - 1)
            members, position = {}, 0
            for _ in range(count):
                (signature, _, _, _, method, _, _, crc, compressed, uncompressed, name_length,
                 extra_length, comment_length, _, _, _, header_offset) = _CENTRAL.unpack_from(directory, position)
                if signature != b"PK\x01\x02":
                    raise DamagedWheel(f"{self.filename}: damaged central directory at byte {position}")
                start = position + _CENTRAL.size
                name = directory[start:start + name_length].decode()
                members[name] = Member(name, method, crc, compressed, uncompressed, header_offset)
                position = start + name_length + extra_length + comment_length
            self._members = members
        return self._members

    def record(self) -> dict[str, str]:
        """The wheel's RECORD: member name -> ``sha256=<urlsafe b64>``."""
        if self._record is None:
            name = next((n for n in self._member_names() if n.endswith(".dist-info/RECORD")), None)
            if name is None:
                raise DamagedWheel(f"{self.filename}: no .dist-info/RECORD")
            text = self._fetch(name).decode()
            self._record = {line.split(",")[0]: line.split(",")[1]
                            for line in text.splitlines() if line.count(",") >= 2}
        return self._record

    def _member_names(self) -> list[str]:
        cached = self.cache / "NAMES"
        if cached.exists():
            return cached.read_text().splitlines()
        names = sorted(self.members())
        self.cache.mkdir(parents=True, exist_ok=True)
        cached.write_text("\n".join(names))
        return names

    def has(self, name: str) -> bool:
        return name in set(self._member_names())

    def read(self, name: str) -> bytes:
        """One member's bytes, checked against RECORD's sha256."""
        data = self._fetch(name)
        expected = self.record().get(name)
        digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        if expected != digest:
            (self.cache / name).unlink(missing_ok=True)
            raise DamagedWheel(f"{self.filename}: {name} has {digest}, its RECORD says {expected}")
        return data

    def _fetch(self, name: str) -> bytes:
        path = self.cache / name
        if path.exists():
            return path.read_bytes()
        member = self.members().get(name)
        if member is None:
            raise KeyError(f"{self.filename} has no member {name}")
        # The local header repeats the name and may carry its own extra field: read it first
        # with some slack, then the data after it.
        slack = 1024
        head = _get(self.url, member.header_offset,
                    member.header_offset + _LOCAL.size + len(name.encode()) + slack + member.compressed_size - 1)
        signature, *_, name_length, extra_length = _LOCAL.unpack_from(head)
        if signature != b"PK\x03\x04":
            raise DamagedWheel(f"{self.filename}: no local header for {name}")
        start = _LOCAL.size + name_length + extra_length
        if start + member.compressed_size > len(head):
            head = _get(self.url, member.header_offset, member.header_offset + start + member.compressed_size - 1)
        raw = head[start:start + member.compressed_size]
        if member.method == 8:
            data = zlib.decompress(raw, -15)
        elif member.method == 0:
            data = raw
        else:
            raise DamagedWheel(f"{self.filename}: {name} uses zip method {member.method}")
        if zlib.crc32(data) != member.crc or len(data) != member.size:
            raise DamagedWheel(f"{self.filename}: {name} fails its CRC-32 or size check")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data
