"""Where a remote object is and how requests for it are made (:class:`Target`),
and the client's retry and timeout settings (:class:`Settings`)."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Target:
    """One object's URL, and how requests for it are made."""

    url: str  # never holds a credential: it is printed in errors
    headers: tuple[tuple[str, str], ...] = ()  # sent with every request (a bearer token)
    # S3: adds the SigV4 headers for (method, target, headers).
    sign: Callable[[str, Target, dict[str, str]], None] | None = dataclasses.field(
        default=None, compare=False
    )

    @property
    def parts(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(self.url)

    def moved(self, location: str) -> Target:
        """The target a redirect points to: credentials stay with their host."""
        url = urllib.parse.urljoin(self.url, location)
        same = urllib.parse.urlsplit(url).netloc == self.parts.netloc
        headers = self.headers if same else ()
        return Target(url, headers, self.sign if same else None)


@dataclasses.dataclass
class Settings:
    timeout: float = 30.0  # seconds per connect and per socket read
    retries: int = 5  # tries after the first, per request
    retry_seconds: float = 60.0  # total time one request may spend retrying
    backoff: float = 0.05  # first backoff, doubled per try, capped at 2 s
    secrets: tuple[str, ...] = ()  # scrubbed from every message
