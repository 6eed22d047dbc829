"""Getting models into the user cache: download from the catalog, or import from disk.

`fetch(name)` downloads a catalog entry ``{"name", "task", "description", "url", "sha256"}``, where
the URL is a .zip of a model folder (model.json + model.safetensors at the zip root or in one top
folder) and sha256 is the zip's SHA-256. `import_model(path)` takes a model folder or such a .zip
from disk, for machines whose network blocks the download (fetch the .zip elsewhere, carry it in).

What a hospital network gets from this module:

* Plain ``urllib.request``, nothing else. HTTP(S) proxies come from the environment as urllib does
  by default (``http_proxy`` / ``https_proxy`` / ``no_proxy``, upper- or lower-case; on Windows and
  macOS also the system proxy settings); a proxy that needs a login takes it in the URL
  (``https_proxy=http://user:password@proxy:8080``). HTTPS certificates are checked against the
  system store; a TLS-inspecting proxy's CA can be added with ``SSL_CERT_FILE=/path/ca.pem``.
* A broken download resumes: the bytes so far stay in ``cache_dir()/.downloads/NAME-HASH.zip.part``
  and the next attempt (a retry here, or the next `fetch`) asks for the rest with an HTTP Range
  request; a server that ignores Range sends the whole file again and the part file restarts.
* Nothing is trusted until its hash matches: a download whose SHA-256 differs from the catalog is
  deleted and refused; a model's weights must match the SHA-256 on its card.
* Nothing from a zip is ever run: only ``.json`` and ``.safetensors`` files are extracted (a zip
  holding anything else, pickles included, is refused; macOS ``__MACOSX/`` and ``.DS_Store``
  entries are skipped), and absolute paths, ``..`` members, symlinks, encrypted or duplicate
  members are refused. Files are written under names this module builds, never the zip's own paths.
* The model is unpacked and checked in a temporary folder inside the cache, then renamed into
  ``cache_dir()/NAME`` in one step: the cache never holds a half-written or unchecked model.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import ssl
import stat
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .errors import Cancelled, DiffusionMICError
from .models import CARD, WEIGHTS, cache_dir, read_card, read_catalog, sha256_file

SOURCE = "source.json"           # written beside the card: where the cached model came from
ALLOWED_SUFFIXES = (".json", ".safetensors")
SKIPPED_ZIP_ENTRIES = ("__MACOSX/",)
SKIPPED_ZIP_NAMES = (".DS_Store",)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHUNK = 1 << 16
TIMEOUT_S = 60.0                 # per socket operation, not for the whole download
RETRIES = 3                      # further attempts after a broken connection within one fetch
RETRY_DELAY_S = 2.0              # times the attempt number
USER_AGENT = "DiffusionMIC-model-fetch/0.1 (urllib)"

ProgressCallback = Callable[[str, int, int], None]


# ---- public -------------------------------------------------------------------------------

def fetch(name: str, *, progress: str = "tqdm", callback: ProgressCallback | None = None,
          cancel: Callable[[], bool] | None = None, retries: int | None = None) -> dict[str, Any]:
    """Download catalog model `name` into ``cache_dir()/name`` (nothing to do if already there).

    Proxies: urllib's defaults (``https_proxy``/``http_proxy``/``no_proxy`` from the environment,
    system settings on Windows/macOS). `progress`: "tqdm" (a byte bar on stderr), "json" (one JSON
    line per percent on stdout) or "none"; `callback(stage, bytes_done, bytes_total)` and `cancel()`
    as in progress.Progress; `retries` (default RETRIES) further attempts, each resuming where the
    last broke off. A cancelled or broken download keeps its .part file for next time.
    Returns a summary dict (name, path, sha256, weights_sha256, bytes, resumed_from, cached).
    """
    entry = _catalog_entry(name)
    url, expected = entry.get("url"), str(entry.get("sha256", "")).lower()
    if not url:
        raise DiffusionMICError(f"model '{name}' is bundled with DiffusionMIC (catalog path), there is nothing to fetch")
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DiffusionMICError(f"catalog entry '{name}' has no valid sha256; refusing to download it unchecked")
    _check_name(name)
    dest = cache_dir() / name
    if dest.is_dir() and _source(dest).get("sha256") == expected:
        try:
            card = validate_model_folder(dest)
            return {"name": name, "path": str(dest), "sha256": expected, "weights_sha256": card.sha256,
                    "bytes": 0, "resumed_from": 0, "cached": True}
        except DiffusionMICError:
            pass                                   # damaged cache copy: download it again
    downloads = cache_dir() / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{name}-{expected[:12]}.zip.part"
    try:
        got, resumed_from = _download(url, part, name, expected, progress, callback, cancel,
                                         RETRIES if retries is None else retries)
        digest = sha256_file(part)
        if digest != expected:
            part.unlink(missing_ok=True)
            raise DiffusionMICError(f"model '{name}': downloaded file SHA-256 {digest[:12]}… does not match the "
                                    f"catalog's {expected[:12]}…; deleted it, nothing installed")
        try:
            card = _install_zip(part, name, source={"url": url, "sha256": expected}, replace=True,
                                catalog_sha=expected)
        finally:
            part.unlink(missing_ok=True)           # verified bytes but a bad model: retrying will not help
    finally:
        _remove_if_empty(downloads)
    return {"name": name, "path": str(dest), "sha256": expected, "weights_sha256": card.sha256,
            "bytes": got, "resumed_from": resumed_from, "cached": False}


def import_model(path: str | Path, name: str | None = None, *, force: bool = False) -> dict[str, Any]:
    """Copy a model folder or a model .zip from disk into ``cache_dir()/NAME``, checked like a download.

    NAME is `name`, else the card's name. A name that is a bundled catalog model is refused; a name
    that is a catalog download accepts only that entry's .zip (its SHA-256 must match the catalog).
    An existing cached model of that name is replaced only with `force` (or if it is the same weights).
    """
    src = Path(path)
    if not src.exists():
        raise DiffusionMICError(f"'{src}' does not exist")
    if src.is_dir():
        if not (src / CARD).is_file():
            raise DiffusionMICError(f"'{src}' is not a model folder: no {CARD}")
        return _import_folder(src, name, force)
    if zipfile.is_zipfile(src):
        return _import_zip(src, name, force)
    raise DiffusionMICError(f"'{src}' is neither a model folder nor a .zip of one")


def validate_model_folder(folder: Path) -> Any:
    """The card must read, the weights must be a safetensors file whose SHA-256 matches the card.

    Lighter than models.load_model: no network is built; the safetensors header is parsed by hand
    (a renamed pickle or a truncated file fails here). Returns the ModelCard.
    """
    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise DiffusionMICError(f"model '{card.name}' has no {WEIGHTS}")
    if not re.fullmatch(r"[0-9a-f]{64}", card.sha256 or ""):
        raise DiffusionMICError(f"model '{card.name}': the card has no valid weights sha256")
    digest = sha256_file(weights)
    if digest != card.sha256:
        raise DiffusionMICError(f"model '{card.name}': weights SHA-256 {digest[:12]}… does not match "
                                f"the card's {card.sha256[:12]}…")
    _check_safetensors(weights, card.name)
    return card


# ---- download -----------------------------------------------------------------------------

class _Retry(Exception):
    """A broken transfer worth another try (connection dropped, timeout, short body, 5xx)."""


def _download(url: str, part: Path, name: str, expected: str, progress: str, callback, cancel,
              retries: int) -> tuple[int, int]:
    """Fill `part` with the whole file at `url`, resuming what it holds. Returns (bytes got, first offset)."""
    first_offset = part.stat().st_size if part.exists() else 0
    got = [0]                                      # bytes received over all attempts
    for attempt in range(retries + 1):
        try:
            _download_once(url, part, name, expected, progress, callback, cancel, got)
            return got[0], first_offset
        except _Retry as e:
            if attempt == retries:
                raise DiffusionMICError(f"model '{name}': download from {_host(url)} broke off ({e}); run "
                                        "'diffusion-mic models fetch' again to resume, or fetch the .zip "
                                        "elsewhere and use 'diffusion-mic models import'") from None
            time.sleep(RETRY_DELAY_S * (attempt + 1))
    raise AssertionError("unreachable")


def _download_once(url: str, part: Path, name: str, expected: str, progress: str, callback, cancel,
                   counter: list[int]) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)   # proxies: from the environment
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:               # nothing past our offset: complete already, or junk
            e.close()
            if sha256_file(part) == expected:
                return
            part.unlink(missing_ok=True)
            raise _Retry("server refused the resume range; starting over") from None
        if e.code >= 500 or e.code == 429:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        hint = (" (the proxy wants a login: put it in https_proxy=http://user:password@host:port)"
                if e.code == 407 else "")
        raise DiffusionMICError(f"model '{name}': download failed: HTTP {e.code} {e.reason} from "
                                f"{_host(url)}{hint}; or fetch the .zip elsewhere and use 'diffusion-mic models import'") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Retry(str(reason)) from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise DiffusionMICError(f"model '{name}': the certificate of {_host(url)} is not trusted ({reason.verify_message}); "
                                    "behind a TLS-inspecting proxy set SSL_CERT_FILE to its CA bundle") from None
        raise DiffusionMICError(f"model '{name}': cannot reach {_host(url)}: {reason}; check the proxy settings "
                                "(https_proxy) or fetch the .zip elsewhere and use 'diffusion-mic models import'") from None
    except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Retry(str(e) or type(e).__name__) from None

    with response:
        status = getattr(response, "status", 200)
        if offset and status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != offset:                    # not the range we asked for: start clean
                part.unlink(missing_ok=True)
                raise _Retry(f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:                                      # 200: the whole file (server ignored Range, or fresh)
            offset, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        expected_body = (total - offset) if total is not None else None
        report = _ByteReport(f"download {name}", total, offset, progress, callback)
        got = 0
        try:
            with open(part, mode) as f:
                while True:
                    if cancel is not None and cancel():
                        raise Cancelled("download cancelled (kept the partial file to resume)")
                    try:
                        chunk = response.read(CHUNK)
                    except (socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                        raise _Retry(str(e) or type(e).__name__) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    counter[0] += len(chunk)
                    report.update(len(chunk))
        finally:
            report.close()
        if expected_body is not None and got < expected_body:
            raise _Retry(f"connection closed after {offset + got} of {total} bytes")


def _content_range(value: str) -> tuple[int, int | None]:
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not m:
        return -1, None
    return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)


class _ByteReport:
    """A tqdm byte bar on stderr, or a JSON line per percent on stdout, plus the callback."""

    def __init__(self, stage: str, total: int | None, initial: int, mode: str, callback):
        self.stage, self.total, self.done, self.mode, self.callback = stage, total, initial, mode, callback
        self._last = -1
        self._bar = None
        if mode == "tqdm":
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=stage, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)
        self._emit()

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        self._emit()

    def _emit(self) -> None:
        steps = self.total or 0
        percent = int(100 * self.done / steps) if steps else self.done >> 20   # unknown size: per MiB
        if percent == self._last:
            return
        self._last = percent
        if self.callback is not None:
            self.callback(self.stage, self.done, steps)
        if self.mode == "json":
            print(json.dumps({"stage": self.stage, "step": self.done, "steps": steps,
                              "fraction": round(self.done / steps, 4) if steps else 0.0}), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ---- zip and folder -----------------------------------------------------------------------

def _safe_members(zf: zipfile.ZipFile, label: str) -> dict[str, zipfile.ZipInfo]:
    """Map of model-folder file name -> zip member, after refusing anything unsafe or unexpected."""
    files: list[tuple[PurePosixPath, zipfile.ZipInfo]] = []
    seen: set[str] = set()
    for info in zf.infolist():
        raw = info.filename
        if raw in seen:
            raise DiffusionMICError(f"{label}: zip member '{raw}' appears twice; refusing it")
        seen.add(raw)
        if "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or "\x00" in raw:
            raise DiffusionMICError(f"{label}: zip member '{raw}' has an absolute or non-portable path; refusing it")
        parts = [p for p in raw.split("/") if p]
        if not parts:
            raise DiffusionMICError(f"{label}: zip member with an empty name; refusing it")
        if any(p in ("..", ".") for p in parts):
            raise DiffusionMICError(f"{label}: zip member '{raw}' would write outside its folder; refusing it")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DiffusionMICError(f"{label}: zip member '{raw}' is a symbolic link; refusing it")
        if info.flag_bits & 0x1:
            raise DiffusionMICError(f"{label}: zip member '{raw}' is encrypted; refusing it")
        if info.is_dir():
            continue
        if raw.startswith(SKIPPED_ZIP_ENTRIES) or parts[-1] in SKIPPED_ZIP_NAMES:
            continue                               # Finder metadata: never extracted
        if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            raise DiffusionMICError(f"{label}: zip member '{raw}' is not a regular file; refusing it")
        if not parts[-1].lower().endswith(ALLOWED_SUFFIXES):
            raise DiffusionMICError(f"{label}: zip member '{raw}' is not .json or .safetensors; "
                                    "refusing the zip (only model cards and safetensors weights are accepted)")
        files.append((PurePosixPath(*parts), info))
    if not files:
        raise DiffusionMICError(f"{label}: the zip holds no model files")
    if len({p.name.lower() for p, _ in files}) != len(files):
        raise DiffusionMICError(f"{label}: the zip holds two files of the same name; refusing it")
    depths = {len(p.parts) for p, _ in files}
    tops = {p.parts[0] for p, _ in files}
    if not (depths == {1} or (depths == {2} and len(tops) == 1)):
        raise DiffusionMICError(f"{label}: model files must be at the zip root or in one top folder")
    members = {p.name: info for p, info in files}
    for required in (CARD, WEIGHTS):
        if required not in members:
            raise DiffusionMICError(f"{label}: the zip has no {required}")
    return members


def _extract(zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], target: Path, label: str) -> None:
    need = sum(info.file_size for info in members.values())
    free = shutil.disk_usage(target).free
    if need > free:
        raise DiffusionMICError(f"{label}: needs {need >> 20} MiB but the cache disk has {free >> 20} MiB free")
    for fname, info in members.items():
        out = target / fname                       # our name, never the zip's path
        written = 0
        try:
            with zf.open(info) as src, open(out, "xb") as dst:
                while chunk := src.read(CHUNK):
                    written += len(chunk)
                    if written > info.file_size:
                        raise DiffusionMICError(f"{label}: zip member '{info.filename}' is larger than it declares")
                    dst.write(chunk)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
            raise DiffusionMICError(f"{label}: cannot unpack '{info.filename}': {e}") from None


def _install_zip(zip_path: Path, name: str | None, *, source: dict[str, Any], replace: bool,
                 catalog_sha: str | None = None) -> Any:
    """Unpack, check and rename a model zip into the cache; returns its card. name None: the card's."""
    label = f"model '{name}'" if name else f"'{zip_path.name}'"
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = _safe_members(zf, label)
                _extract(zf, members, tmp, label)
        except zipfile.BadZipFile as e:
            raise DiffusionMICError(f"{label}: not a valid zip file ({e})") from None
        card = validate_model_folder(tmp)
        name = name or card.name
        _check_name(name)
        _check_catalog_clash(name, catalog_sha, is_zip=True)
        (tmp / SOURCE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        _move_into_cache(tmp, name, card, replace)
        return card
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _import_zip(src: Path, name: str | None, force: bool) -> dict[str, Any]:
    digest = sha256_file(src)
    card = _install_zip(src, name, source={"imported_from": str(src.resolve()), "sha256": digest},
                        replace=force, catalog_sha=digest)
    name = name or card.name
    return {"name": name, "path": str(cache_dir() / name), "source": str(src), "sha256": digest,
            "weights_sha256": card.sha256}


def _import_folder(src: Path, name: str | None, force: bool) -> dict[str, Any]:
    card = read_card(src)
    name = name or card.name
    _check_name(name)
    _check_catalog_clash(name, None, is_zip=False)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    skipped = []
    try:
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix.lower() in ALLOWED_SUFFIXES and f.name != SOURCE:
                shutil.copyfile(f, tmp / f.name)   # content only: no modes, no links
            else:
                skipped.append(f.name)             # checkpoints (pickles), logs, folders: left behind
        card = validate_model_folder(tmp)          # the copy is what gets checked and used
        (tmp / SOURCE).write_text(json.dumps({"imported_from": str(src.resolve())}, indent=2) + "\n", encoding="utf-8")
        _move_into_cache(tmp, name, card, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"name": name, "path": str(root / name), "source": str(src), "weights_sha256": card.sha256,
            "skipped": skipped}


def _move_into_cache(tmp: Path, name: str, card: Any, replace: bool) -> None:
    dest = cache_dir() / name
    if not dest.exists():
        os.replace(tmp, dest)
        return
    if not replace:
        try:
            same = read_card(dest).sha256 == card.sha256 and sha256_file(dest / WEIGHTS) == card.sha256
        except (DiffusionMICError, OSError):
            same = False
        if not same:
            raise DiffusionMICError(f"a different model named '{name}' is already in the cache ({dest}); "
                                    "use --force to replace it or --name to import under another name")
    old = dest.with_name(f".{name}-old-{uuid.uuid4().hex[:8]}")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_safetensors(path: Path, label: str) -> None:
    """Parse the safetensors header: 8-byte length, JSON table, offsets that cover the file exactly."""
    size = path.stat().st_size
    bad = DiffusionMICError(f"model '{label}': {WEIGHTS} is not a valid safetensors file")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise bad
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > min(size - 8, 100 << 20):
            raise bad
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad from None
    if not isinstance(header, dict):
        raise bad
    end = 0
    for key, t in header.items():
        if key == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and "dtype" in t and "shape" in t):
            raise bad
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise bad


# ---- small helpers ------------------------------------------------------------------------

def _catalog_entry(name: str) -> dict[str, Any]:
    for entry in read_catalog():
        if entry.get("name") == name:
            return entry
    raise DiffusionMICError(f"no catalog entry named '{name}' (see 'diffusion-mic models list')")


def _check_catalog_clash(name: str, zip_sha: str | None, *, is_zip: bool) -> None:
    """An import may not shadow a bundled model nor stand in for a catalog download unchecked."""
    for entry in read_catalog():
        if entry.get("name") != name:
            continue
        if "url" not in entry:
            raise DiffusionMICError(f"'{name}' is a bundled catalog model; import under another --name")
        expected = str(entry.get("sha256", "")).lower()
        if not is_zip:
            raise DiffusionMICError(f"'{name}' is a catalog download: import its .zip (checked against the "
                                    "catalog's SHA-256) or choose another --name")
        if zip_sha != expected:
            raise DiffusionMICError(f"'{name}' is a catalog download but this zip's SHA-256 {str(zip_sha)[:12]}… "
                                    f"does not match the catalog's {expected[:12]}…")


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        raise DiffusionMICError(f"model name {name!r} cannot be a cache folder name "
                                "(letters, digits, '.', '_', '-'; starting with a letter or digit)")


def _source(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _host(url: str) -> str:
    from urllib.parse import urlsplit
    return urlsplit(url).hostname or url


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass

