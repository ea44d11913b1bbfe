"""The CLI's side: its config file, the app-name lookup and a small HTTP client.

The CLI runs outside any reactor, so it uses the standard library (``urllib``).
Every failure becomes a :class:`CliError` with one clear sentence.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from epio.secretfile import write_secret_file

APP_FILE = ".epio-app"
USER_AGENT = "epio-cli"


USAGE = 2
"""The exit status of a usage error (a malformed argument), as argparse's."""


class CliError(Exception):
    """A failure to report as one sentence and a non-zero exit status; ``hint`` (a
    second line) says what to do instead, ``code`` is the API's error code if any."""

    def __init__(self, message: str, status: int = 1, hint: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.hint = hint
        self.code = code


HINTS: dict[str, str] = {
    "no_shared_postgres": "`epio addons create postgres --dedicated` runs a PostgreSQL "
                          "server of the app's own",
}
"""What to do instead, by the API's error code, shown under its message."""


# --- config ------------------------------------------------------------------------


def config_dir() -> Path:
    """``$EPIO_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/epio``, else ``~/.config/epio``."""
    if os.environ.get("EPIO_CONFIG_DIR"):
        return Path(os.environ["EPIO_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "epio"


def config_path() -> Path:
    return config_dir() / "config.json"


def load_config() -> dict[str, Any]:
    path = config_path()
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def save_config(data: dict[str, Any]) -> Path:
    """Write the config file with mode 0600 (it holds the API token)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return write_secret_file(path, json.dumps(data, indent=2) + "\n")


def find_app_file(start: Path) -> Path | None:
    """The nearest ``.epio-app`` in ``start`` or a parent directory."""
    start = start.resolve()
    for d in [start, *start.parents]:
        candidate = d / APP_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_app(explicit: str | None, *dirs: Path) -> str:
    """``--app``, else the ``.epio-app`` of the given dirs (or their parents), else cwd's."""
    if explicit:
        return explicit
    for d in [*dirs, Path.cwd()]:
        found = find_app_file(d)
        if found is not None:
            name = found.read_text("utf-8").strip()
            if name:
                return name
    raise CliError("which app? Pass --app NAME, or run inside an app directory with a "
                   f"{APP_FILE} file (epio apps create writes one)")


# --- HTTP --------------------------------------------------------------------------


class Client:
    """JSON calls to ``{api}/api/v1/...`` with the bearer token."""

    def __init__(self, api: str, token: str | None, timeout: float = 60.0) -> None:
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_config(cls) -> Client:
        cfg = load_config()
        api = os.environ.get("EPIO_API") or cfg.get("api")
        token = os.environ.get("EPIO_TOKEN") or cfg.get("token")
        if not api or not token:
            raise CliError("not logged in: run `epio login --api URL` first")
        return cls(api, token)

    def url(self, path: str, query: dict[str, Any] | None = None) -> str:
        url = f"{self.api}/api/v1/{path.lstrip('/')}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        return url

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None, data: BinaryIO | bytes | None = None,
                content_type: str | None = None, length: int | None = None) -> Any:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        payload: Any = data
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        req = urllib.request.Request(self.url(path, query), data=payload, headers=headers,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise api_error(e) from None
        except urllib.error.URLError as e:
            raise CliError(f"cannot reach the epio API at {self.api}: {_reason(e.reason)}") \
                from None
        except (TimeoutError, OSError) as e:
            raise CliError(f"the epio API at {self.api} did not answer: {_reason(e)}") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"the server at {self.api} did not answer JSON; is it an epio API?") \
                from None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _reason(reason: Any) -> str:
    text = getattr(reason, "strerror", None) or str(reason)
    return text or type(reason).__name__


def api_error(e: urllib.error.HTTPError) -> CliError:
    """The CliError for an API error answer: its message, code and hint (if any)."""
    message, code = _http_error(e)
    return CliError(message, hint=HINTS.get(code or ""), code=code)


def _http_error(e: urllib.error.HTTPError) -> tuple[str, str | None]:
    """The API's message and code of an error answer."""
    try:
        body = json.loads(e.read())
        message, code = body["error"]["message"], body["error"].get("code")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"the API answered {e.code} {e.reason}", None
    if e.code == 401:
        return f"{message}; run `epio login` again", code
    return str(message), code


class ProgressReader:
    """A file wrapper that reports how much was read (for the upload bar)."""

    def __init__(self, f: BinaryIO, total: int, report: Callable[[int, int], None]) -> None:
        self.f = f
        self.total = total
        self.done = 0
        self.report = report

    def read(self, size: int = -1) -> bytes:
        chunk = self.f.read(size if size and size > 0 else 64 * 1024)
        self.done += len(chunk)
        self.report(self.done, self.total)
        return chunk

    def __len__(self) -> int:
        return self.total


def progress_bar(stream: Any = None) -> Callable[[int, int], None]:
    stream = stream or sys.stderr

    def report(done: int, total: int) -> None:
        width = 30
        frac = done / total if total else 1.0
        filled = int(width * frac)
        stream.write(f"\rUploading [{'#' * filled}{'.' * (width - filled)}] "
                     f"{done / 1e6:.1f}/{total / 1e6:.1f} MB")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return report
