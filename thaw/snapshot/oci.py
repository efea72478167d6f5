"""A client of the OCI distribution API (``/v2/``): auth, TLS, deadlines, blobs and manifests.

What :mod:`thaw.snapshot.registry` needs from a registry and no more: HEAD/GET/PUT of manifests,
HEAD/GET of blobs (ranged), monolithic blob uploads (POST then PUT, with a cross-repository mount
tried first), manifest DELETE, tag and catalog listing (paginated by ``Link``).

Built on urllib3 (the HTTP library under both ``requests`` and the official kubernetes client, so
already in every Thaw image), not on ``requests`` or ``oras``: urllib3 takes an ``ssl.SSLContext``
as is (the system trust plus ``--registry-ca``, where requests verifies against certifi's bundle and
reads ``REQUESTS_CA_BUNDLE``/``.netrc`` from the environment), streams bodies both ways without
buffering, is typed (mypy --strict), and lets Thaw own every retry, redirect and deadline. oras-py
wraps requests and adds a whole-blob pull and push; the parts Thaw needs (ranged resume, parallel
chunks, hashing as bytes arrive, HEAD before push, mount) would be written on top of it anyway.

Credentials come from a Docker ``config.json`` (the ``.dockerconfigjson`` key of a
``kubernetes.io/dockerconfigjson`` Secret): ``auths[HOST]`` with ``auth`` (base64 of
``user:password``), ``username``/``password``, or ``identitytoken`` (an OAuth2 refresh token).
The registry's ``WWW-Authenticate`` challenge picks the scheme: ``Basic`` sends the credentials,
``Bearer`` gets a token from the realm for the scope asked (with the credentials, or anonymously
without them), caches it until it expires, and retries once.

Every request has a deadline: connect and per-read timeouts on the socket, and callers that stream
check their own overall deadline between reads (:class:`Deadline`). Every failure raises
:class:`RegistryError` (a ``StoreError``) whose message names the registry and what happened, in
words a cold-start reason can carry ("registry 10.0.0.5:5000 refused the credentials (401)").
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import orjson
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from thaw.snapshot.store import StoreError

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0  # no byte for this long on an open connection: the registry is stalled
SMALL_BODY_BYTES = 4 * 1024 * 1024  # JSON answers (tags, tokens, errors); manifests have their own cap
MAX_AUTH_FILE_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
TOKEN_MIN_LIFETIME_S = 60  # the distribution spec's default when a token server omits expires_in
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


class RegistryError(StoreError):
    """The registry cannot be reached, refused us, or answered something unusable. ``transient``:
    worth another try (a broken or timed-out connection, a 5xx), as opposed to an answer."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RegistryAuthError(RegistryError):
    """The registry refused the credentials (or asked for some and there are none)."""


class NotFound(RegistryError):
    """404 for a manifest, blob or repository."""


# --- references and options (pure) -------------------------------------------------------------


@dataclass(frozen=True)
class RegistryRef:
    """``oci://HOST[:PORT]/REPOSITORY``: where a store's repositories live."""

    host: str  # as written, with the port when one was given (the key in config.json)
    repository: str  # path prefix: every snapshot repository is REPOSITORY/<namespace>/<name>

    def __str__(self) -> str:
        return f"oci://{self.host}/{self.repository}"

    @property
    def hostname(self) -> str:
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host[1:].split("]")[0]
        return name

    def repo(self, *components: str) -> str:
        return "/".join((self.repository, *components))


def parse_ref(spec: str) -> RegistryRef:
    """Parse ``oci://HOST[:PORT]/REPOSITORY``; ValueError naming what is wrong and what is allowed."""
    if not spec.startswith("oci://"):
        raise ValueError(f"a registry store is oci://HOST[:PORT]/REPOSITORY, got {spec!r}")
    rest = spec[len("oci://") :]
    host, _, repository = rest.partition("/")
    repository = repository.strip("/")
    m = _HOST.match(host)
    if not m or (m.group(2) and not 0 < int(m.group(2)) < 65536):
        raise ValueError(f"registry store {spec!r}: {host!r} is not HOST or HOST:PORT")
    if not repository:
        raise ValueError(
            f"registry store {spec!r} names no repository: oci://HOST[:PORT]/REPOSITORY, e.g. "
            "oci://registry.example:5000/thaw/snapshots"
        )
    for part in repository.split("/"):
        if not _REPO_COMPONENT.match(part):
            raise ValueError(
                f"registry store {spec!r}: repository component {part!r} must be lower-case letters and "
                "digits separated by '.', '_', '__' or '-' (the distribution spec's path component)"
            )
    return RegistryRef(host, repository)


def is_loopback(hostname: str) -> bool:
    if hostname.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None  # an OAuth2 refresh token (docker login to some registries)

    @property
    def basic(self) -> str | None:
        if self.username is None or self.password is None:
            return None
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _auth_key_host(key: str) -> str:
    """config.json keys are HOST[:PORT], or a URL (``https://index.docker.io/v1/``)."""
    if "://" in key:
        key = urlsplit(key).netloc
    return key.split("/", 1)[0].lower()


def credentials_for(config: Any, host: str) -> Credentials | None:
    """The credentials a Docker ``config.json`` holds for ``host``, or None. ValueError names an
    entry that is malformed. ``credsStore``/``credHelpers`` name external programs: not run."""
    if not isinstance(config, dict):
        raise ValueError("a Docker config.json must be a JSON object")
    auths = config.get("auths", {})
    if not isinstance(auths, dict):
        raise ValueError('"auths" must be an object of HOST -> {"auth": ...}')
    want = host.lower()
    for key, entry in auths.items():
        if _auth_key_host(str(key)) != want:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f'auths["{key}"] must be an object')
        ident = entry.get("identitytoken")
        user, password = entry.get("username"), entry.get("password")
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f'auths["{key}"].auth is not base64 of USER:PASSWORD') from None
        return Credentials(
            username=user if isinstance(user, str) and user else None,
            password=password if isinstance(password, str) else None,
            identity_token=ident if isinstance(ident, str) and ident else None,
        )
    return None


def read_auth_file(path: Path) -> Any:
    """A Docker config.json (or the directory a dockerconfigjson Secret is mounted at). Bounded read.
    Symlinks are followed: kubelet projects Secret keys through ``..data/`` links, and the mount is
    read-only and kubelet's, not a place a workload can write."""
    if path.is_dir():
        for name in (".dockerconfigjson", "config.json"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise ValueError(f"{path} holds neither .dockerconfigjson nor config.json")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        raw = f.read(MAX_AUTH_FILE_BYTES + 1)
    if len(raw) > MAX_AUTH_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_AUTH_FILE_BYTES} bytes")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lower case
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """The first Basic or Bearer challenge of a ``WWW-Authenticate`` header, or None."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in
              _CHALLENGE_PARAM.finditer(rest)}  # fmt: skip
    params = {k: re.sub(r"\\(.)", r"\1", v) for k, v in params.items()}
    return Challenge(scheme.lower(), params)


def next_link(header: str | None, base: str) -> str | None:
    """The ``rel="next"`` target of a ``Link`` header (tag and catalog pagination), absolute."""
    if not header:
        return None
    for part in header.split(","):
        m = re.match(r'\s*<([^>]*)>\s*;\s*rel="?next"?', part)
        if m:
            return urljoin(base, str(m.group(1)))
    return None


# --- deadlines ---------------------------------------------------------------------------------


@dataclass
class Deadline:
    """An overall deadline (monotonic seconds) that streaming loops check between reads."""

    at: float
    what: str  # for the message: "fetch of snapshot sha256:…"

    @classmethod
    def after(cls, seconds: float, what: str) -> Deadline:
        return cls(time.monotonic() + seconds, what)

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, host: str) -> None:
        if self.left() <= 0:
            raise RegistryError(f"registry {host} too slow: {self.what} ran past its deadline")

    def timeout(self) -> urllib3.Timeout:
        """Socket timeouts never past the deadline (a stalled read is bounded either way)."""
        left = max(0.5, self.left())
        return urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, left), read=min(READ_TIMEOUT_S, left))


# --- the client --------------------------------------------------------------------------------


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    raw: urllib3.BaseHTTPResponse = field(repr=False)
    url: str

    def read_all(self, limit: int) -> bytes:
        data = self.raw.read(limit + 1, decode_content=True)
        self.raw.release_conn()
        if len(data) > limit:
            raise RegistryError(f"answer from {self.url} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        self.raw.drain_conn()
        self.raw.release_conn()


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust, plus ``ca_file`` when given (a private registry's CA)."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--registry-ca {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    return ctx


class Client:
    """One registry host. Thread-safe: one connection pool, tokens cached per scope under a lock."""

    def __init__(
        self,
        ref: RegistryRef,
        credentials: Credentials | None,
        *,
        ca_file: Path | None = None,
        plain_http: bool = False,
        connections: int = 8,
    ) -> None:
        if plain_http and not is_loopback(ref.hostname):
            raise ValueError(
                f"--registry-plain-http is allowed only for a loopback registry (127.0.0.0/8, ::1, "
                f"localhost), not {ref.hostname}: credentials and snapshots (process memory, secrets "
                "included) would cross the network unencrypted; give the registry TLS and --registry-ca"
            )
        self.ref = ref
        self.credentials = credentials
        self.base = f"{'http' if plain_http else 'https'}://{ref.host}"
        self.trust = f"--registry-ca {ca_file} and the system trust" if ca_file else "the system trust"
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=connections,
            ssl_context=None if plain_http else ssl_context(ca_file),
            retries=False,
        )
        self._tokens: dict[str, _Token] = {}
        self._basic_ok = False  # the registry answered Basic: send credentials up front from now on
        self._lock = threading.Lock()

    # --- transport --------------------------------------------------------------------------

    def _describe(self, exc: BaseException) -> str:
        host = self.ref.host
        if isinstance(exc, SSLError):
            return (
                f"registry {host}: TLS verification failed ({exc.__context__ or exc}); trusted: {self.trust}"
            )
        # NameResolutionError < NewConnectionError < ConnectTimeoutError in urllib3: most specific first.
        if isinstance(exc, NameResolutionError):
            return f"registry {host} unreachable: cannot resolve {self.ref.hostname}"
        if isinstance(exc, NewConnectionError):
            reason = str(exc).rsplit(":", 1)[-1].strip()
            return f"registry {host} unreachable: {reason or 'connection failed'}"
        if isinstance(exc, ConnectTimeoutError):
            return f"registry {host} unreachable: no connection within {CONNECT_TIMEOUT_S:.0f} s"
        if isinstance(exc, ReadTimeoutError):
            return f"registry {host} too slow: no data for {READ_TIMEOUT_S:.0f} s"
        if isinstance(exc, ProtocolError):
            return f"registry {host} broke the connection: {exc.args[0] if exc.args else exc}"
        return f"registry {host}: {type(exc).__name__}: {exc}"

    def _send(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | Iterable[bytes] | None,
        deadline: Deadline,
    ) -> Response:
        deadline.check(self.ref.host)
        try:
            raw = self.pool.request(
                method,
                url,
                headers=headers,
                body=body,  # urllib3 streams an iterable of bytes
                preload_content=False,
                redirect=False,
                timeout=deadline.timeout(),
                chunked=False,
            )
        except HTTPError as exc:
            raise RegistryError(self._describe(exc), transient=True) from exc
        return Response(raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw, url)

    def describe_error(self, exc: BaseException) -> str:
        return self._describe(exc)

    # --- auth -------------------------------------------------------------------------------

    def _token(self, challenge: Challenge, scope: str, deadline: Deadline) -> str:
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.ref.host} asked for a bearer token with no usable realm")
        if realm.startswith("http://") and not is_loopback(urlsplit(realm).hostname or ""):
            raise RegistryError(
                f"registry {self.ref.host}: token realm {realm} is plain HTTP; refusing to send credentials"
            )
        query = {
            "service": challenge.params.get("service", ""),
            "scope": challenge.params.get("scope", scope),
        }
        creds = self.credentials
        headers = {"Accept": "application/json"}
        body: bytes | None = None
        if creds is not None and creds.identity_token:
            method, url = "POST", realm
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urlencode(
                {
                    **query,
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "thaw",
                }
            ).encode()
        else:
            method, url = "GET", realm + ("&" if "?" in realm else "?") + urlencode(query)
            if creds is not None and creds.basic:
                headers["Authorization"] = creds.basic
        try:
            raw = self.pool.request(
                method, url, headers=headers, body=body, preload_content=False, redirect=False,
                timeout=deadline.timeout(),
            )  # fmt: skip
        except HTTPError as exc:
            raise RegistryError(f"token server {realm}: {self._describe(exc)}") from exc
        resp = Response(raw.status, {k.lower(): v for k, v in raw.headers.items()}, raw, url)
        data = resp.read_all(SMALL_BODY_BYTES)
        if resp.status in (401, 403):
            raise RegistryAuthError(
                f"registry {self.ref.host} refused the credentials ({resp.status} from its token server)"
                + ("" if creds else "; no credentials for this host in --registry-auth")
            )
        if resp.status != 200:
            raise RegistryError(f"registry {self.ref.host}: token server answered {resp.status}")
        try:
            answer = orjson.loads(data)
            value = answer.get("token") or answer.get("access_token")
            expires_in = float(answer.get("expires_in") or TOKEN_MIN_LIFETIME_S)
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise RegistryError(f"registry {self.ref.host}: token server answered no token") from None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"registry {self.ref.host}: token server answered no token")
        # Renew a little early: a token that expires mid-pull costs a 401 and a retry, not a failure.
        with self._lock:
            self._tokens[scope] = _Token(value, time.monotonic() + max(10.0, expires_in - 10.0))
        return value

    def _authorization(self, scope: str) -> str | None:
        with self._lock:
            tok = self._tokens.get(scope)
            if tok is not None and tok.expires > time.monotonic():
                return "Bearer " + tok.value
            basic_ok = self._basic_ok
        if basic_ok and self.credentials is not None:
            return self.credentials.basic
        return None

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        deadline: Deadline,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        body_stream: Any = None,
        follow: bool = True,
    ) -> Response:
        """One request with auth (answering one challenge) and redirects (Authorization dropped when
        the host changes: a blob's redirect goes to storage that must not see registry tokens).
        ``body_stream`` is a callable returning a fresh iterable of bytes (an upload can be re-sent
        after a challenge). Returns the final response, whatever its status."""
        url = path_or_url if "://" in path_or_url else self.base + path_or_url
        base_headers = dict(headers or {})
        for attempt in range(2):
            h = dict(base_headers)
            auth = self._authorization(scope)
            if auth:
                h["Authorization"] = auth
            data = body_stream() if body_stream is not None else body
            resp = self._send(method, url, h, data, deadline)
            if resp.status == 401 and attempt == 0:
                challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                resp.close()
                if challenge is None:
                    raise RegistryAuthError(f"registry {self.ref.host} answered 401 with no usable challenge")
                if challenge.scheme == "basic":
                    if self.credentials is None or self.credentials.basic is None:
                        raise RegistryAuthError(
                            f"registry {self.ref.host} asks for credentials (401) and --registry-auth "
                            "has none for it"
                        )
                    if auth is not None:
                        break  # we sent them and they were refused
                    with self._lock:
                        self._basic_ok = True
                else:
                    self._token(challenge, scope, deadline)
                continue
            if resp.status == 401:
                resp.close()
                break
            hops = 0
            while follow and resp.status in (301, 302, 303, 307, 308) and hops < MAX_REDIRECTS:
                target = resp.headers.get("location")
                resp.close()
                if not target:
                    raise RegistryError(f"registry {self.ref.host} redirected with no Location")
                target = urljoin(url, target)
                same = urlsplit(target).netloc == urlsplit(url).netloc
                h2 = {k: v for k, v in h.items() if same or k != "Authorization"}
                resp = self._send("GET" if resp.status == 303 else method, target, h2, None, deadline)
                hops += 1
            return resp
        raise RegistryAuthError(f"registry {self.ref.host} refused the credentials (401)")

    # --- helpers for the store --------------------------------------------------------------

    def fail(self, resp: Response, what: str) -> RegistryError:
        """The error for an unexpected answer (the body is read, bounded, for the registry's words)."""
        try:
            detail = resp.read_all(64 * 1024)
            errors = orjson.loads(detail).get("errors") or []
            words = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except (RegistryError, orjson.JSONDecodeError, AttributeError):
            words = ""
        suffix = f": {words}" if words else ""
        if resp.status == 403:
            return RegistryAuthError(f"registry {self.ref.host} denied {what} (403){suffix}")
        if resp.status == 404:
            return NotFound(f"registry {self.ref.host}: {what}: not found (404){suffix}")
        if resp.status == 416:
            return RegistryError(f"registry {self.ref.host}: {what}: range not satisfiable (416)")
        return RegistryError(f"registry {self.ref.host}: {what} answered {resp.status}{suffix}")

    def paginate(
        self, path: str, key: str, *, scope: str, deadline: Deadline, limit: int
    ) -> tuple[list[str], bool]:
        """Every value under ``key`` across ``Link: <...>; rel="next"`` pages, at most ``limit``;
        whether more were left."""
        out: list[str] = []
        url: str | None = self.base + path
        while url is not None:
            resp = self.request(
                "GET", url, scope=scope, deadline=deadline, headers={"Accept": "application/json"}
            )
            if resp.status != 200:
                raise self.fail(resp, f"listing {path.split('?', maxsplit=1)[0]}")
            data = resp.read_all(SMALL_BODY_BYTES)
            try:
                values = orjson.loads(data).get(key) or []
            except (orjson.JSONDecodeError, AttributeError):
                raise RegistryError(f"registry {self.ref.host}: {path} answered no JSON object") from None
            out.extend(v for v in values if isinstance(v, str))
            if len(out) >= limit:
                return out[:limit], True
            url = next_link(resp.headers.get("link"), url)
            if url is not None and urlsplit(url).netloc != urlsplit(self.base).netloc:
                raise RegistryError(f"registry {self.ref.host} paginated to another host: {url}")
        return out, False

    def stream(self, resp: Response, chunk: int) -> Iterator[bytes]:
        """The body of ``resp`` in pieces of at most ``chunk`` bytes; transport errors as RegistryError."""
        try:
            while True:
                data = resp.raw.read(chunk, decode_content=False)
                if not data:
                    return
                yield data
        except HTTPError as exc:
            raise RegistryError(self._describe(exc), transient=True) from exc
        finally:
            resp.raw.release_conn()
