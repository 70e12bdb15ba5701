"""Weight files named by path or URL: a URL is downloaded once into torch.hub's cache and checked.

``https://`` and ``http://`` are read with the standard library, other fsspec URLs (``s3://``,
``gs://``, ...) with fsspec, and ``file://`` is a local path. A downloaded file lands in
``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``; by default ``~/.cache/torch/hub``) under
the URL's last path segment, so a file torch.hub or another tool already fetched is found there.

Integrity follows torch.hub and MMDetection: a file name ending in ``-<8 or more hex digits>``
before its extension (``resnet50-0676ba61.pth``) names the start of its sha256. Such a URL's file
is checked when downloaded and again each time the cache serves it (a ``file://`` URL's file on
each use; a plain path is the user's own file and is not checked); a mismatch is refused with both
digests. A download goes to a temporary name in the cache directory and is renamed only when it is
complete and checked, so a dropped connection or a refused file leaves no cache entry.

``--offline`` (or ``PKD_OFFLINE=1``) never touches the network: a URL must then be in the cache.
Nothing here unpickles: callers load the local file with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from pkd_offline.errors import PkdError

OFFLINE_ENV = "PKD_OFFLINE"
BLOCK = 1 << 20  # bytes read and hashed per step
TIMEOUT_S = 60.0  # seconds without a byte before an HTTP download is given up
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HASH_SUFFIX = re.compile(r"-([0-9a-f]{8,64})(?:\.[^.-]*)*$")  # name-<hex>.pth, name-<hex>.tar.gz


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is a URL (``scheme://...``). A ``Path`` never is: it folds ``//`` into ``/``."""
    return isinstance(source, str) and bool(_URL.match(source))


def cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: ``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def is_offline() -> bool:
    """Whether ``PKD_OFFLINE`` is set to anything but empty, ``0``, ``false`` or ``no``."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def offline_mode(enabled: bool) -> Iterator[None]:
    """Within the block, ``is_offline()`` holds if ``enabled`` (the ``--offline`` flag); restored after."""
    previous = os.environ.get(OFFLINE_ENV)
    if enabled:
        os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = previous


def expected_hash_prefix(name: str) -> str | None:
    """The lowercase hex digits a file name carries as ``-<hex>`` before its extension, or None."""
    match = _HASH_SUFFIX.search(name)
    return match[1] if match else None


def file_sha256(path: Path) -> str:
    """Hex sha256 of a local file (imported late: the config module imports this one, and stays light)."""
    from pkd_offline.data import file_sha256 as sha256_of

    return sha256_of(path)


def check_hash(name: str, actual_sha256: str, source: str, *, where: str) -> None:
    """PkdError when ``name`` carries a hash prefix that ``actual_sha256`` does not start with."""
    expected = expected_hash_prefix(name)
    if expected is not None and not actual_sha256.startswith(expected):
        raise PkdError(f"{source}: sha256 mismatch ({where}): the file name expects {expected}, the file is "
                       f"{actual_sha256}: refused")


def fetch_weights(source: str | Path, *, progress: bool | None = None) -> Path:
    """The local file for ``source``: a path (returned as is, existence not checked), a ``file://`` URL, or
    a URL downloaded into :func:`cache_dir` unless already there. ``progress``: a tqdm bar on stderr
    (None: only on a terminal). PkdError for a failed, incomplete or mismatching download, and for a
    URL not in the cache when offline."""
    if not is_url(source):
        return Path(source)
    url = str(source)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
        if local.is_file():
            check_hash(local.name, file_sha256(local), url, where="local file")
        return local
    name = Path(parsed.path).name
    if not name:
        raise PkdError(f"weights URL {url} names no file (its path ends in '/')")
    target = cache_dir() / name
    if target.is_file():
        check_hash(name, file_sha256(target), url, where=f"cached file {target}")
        return target
    if is_offline():
        raise PkdError(f"weights URL {url} is not in the cache ({target}) and offline mode ({OFFLINE_ENV}=1 or "
                       f"--offline) forbids downloading: run once online, or put the file there")
    target.parent.mkdir(parents=True, exist_ok=True)
    _download(url, target, progress)
    return target


def _download(url: str, target: Path, progress: bool | None) -> None:
    """Stream ``url`` into a temporary file beside ``target``, check size and hash, rename it into place."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out:
            with _open_remote(url) as (stream, size):
                digest, written = _copy(stream, out, size, target.name, progress)
        if size is not None and written != size:
            raise PkdError(f"download of {url} ended after {written} of {size} bytes (connection dropped): nothing "
                           f"was cached; run again")
        check_hash(target.name, digest, url, where="download")
        os.replace(temporary, target)
    except (OSError, http.client.HTTPException) as error:
        raise PkdError(f"download of {url} failed ({type(error).__name__}: {_reason(error)}): nothing was cached; "
                       f"run again") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextmanager
def _open_remote(url: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """A readable stream of ``url`` and its size in bytes (None if the server does not say)."""
    scheme = urllib.parse.urlparse(url).scheme
    if scheme in ("http", "https"):
        request = urllib.request.Request(url, headers={"User-Agent": "pkd-offline"})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only, checked above
        except urllib.error.HTTPError as error:
            raise PkdError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError) as error:
            raise PkdError(f"cannot download {url}: {_reason(error)}") from None
        with response:
            length = response.headers.get("Content-Length")
            yield response, int(length) if length and length.isdigit() else None
        return
    import fsspec

    try:
        opened = fsspec.open(url, "rb")
        size = opened.fs.size(opened.path)
        stream = opened.open()
    except FileNotFoundError:
        raise PkdError(f"cannot download {url}: no such object") from None
    except (ImportError, ValueError, OSError) as error:  # unknown protocol, its package missing, no access
        raise PkdError(f"cannot download {url}: {_reason(error)}") from None
    with stream:
        yield stream, size


def _copy(stream: BinaryIO, out: BinaryIO, size: int | None, name: str, progress: bool | None) -> tuple[str, int]:
    """Copy ``stream`` to ``out`` with a progress bar; returns (hex sha256, bytes written)."""
    from tqdm import tqdm

    digest, written = hashlib.sha256(), 0
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}",
              disable=None if progress is None else not progress) as bar:
        while block := stream.read(BLOCK):
            out.write(block)
            digest.update(block)
            written += len(block)
            bar.update(len(block))
    return digest.hexdigest(), written


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or error
    return str(reason).splitlines()[0] if str(reason) else type(error).__name__
