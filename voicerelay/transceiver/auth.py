"""Who may use signaling: the API key, client tokens minted from it, and the CORS allow-list.

Pure code driven with an injected `now` (unix seconds: client tokens carry a wall-clock
expiry), except `load_or_create_api_key`, which reads or writes the key file.

- The **API key** is for an app's backend (server to server): `Authorization: Bearer <key>`.
  It may do everything: place calls, mint client tokens, read `/v1/stats`.
- A **client token** is what that backend hands its browser (the shape of OpenAI's ephemeral
  keys): `vrct_` + base64url(version | expires_at u32 | nonce 12 | HMAC-SHA256 tag 16), the
  tag keyed by a key derived from the API key, so the transceiver keeps no list of tokens it
  minted. A token places **one** call (single use, until it expires) and stays the key to
  that call's resource (GET, DELETE, events) for the call's life, also after it expires.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from voicerelay.config import ConfigError

API_KEY_FILE = "api.key"  # in the state directory, created 0600 when needed
API_KEY_PREFIX = "vrk_"  # keys this module generates (any 16-256 visible ASCII is accepted)
TOKEN_PREFIX = "vrct_"
DEFAULT_TOKEN_LIFETIME = 60  # seconds
MAX_TOKEN_LIFETIME = 600
USED_TOKENS_CAPACITY = 200_000  # single-use memory (about 20 MB when full)
GRANTS_PRUNE_AT = 1024  # session grants are checked against live calls past this many

_API_KEY = re.compile(r"[\x21-\x7e]{16,256}")
_BODY = struct.Struct("!BI12s")  # version, expires_at (unix s), nonce
_TAG_SIZE = 16
_TOKEN_SIZE = _BODY.size + _TAG_SIZE
_VERSION = 1
_TOKEN_KEY_LABEL = b"voicerelay client tokens v1"


class AuthError(Exception):
    """A request is refused: `status` (401: no or a wrong credential, 403: a credential that
    does not grant this), `reason` (a counter name) and a one-line message for the caller."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


# API keys ---------------------------------------------------------------------------------------
def check_api_key(key: str, source: str = "--api-key") -> str:
    """`key` if it can be an API key (16-256 visible ASCII characters), else ConfigError."""
    if not _API_KEY.fullmatch(key):
        raise ConfigError(
            f"{source} is not 16-256 visible ASCII characters: use a long random string "
            "(or leave it out and the transceiver creates one)"
        )
    return key


def new_api_key() -> str:
    """A fresh random API key (256 bits)."""
    return API_KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


def load_or_create_api_key(path: Path) -> tuple[str, bool]:
    """The API key in `path`, created (0600, in a 0700 directory if it has to make one) with
    a new random key if missing; (key, created). ConfigError (one line) if it cannot be read
    or written, or others can read it."""
    created = False
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(
            f"cannot create the API key file {path} ({exc.strerror}): "
            "use a writable --state-dir or give --api-key"
        ) from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(new_api_key() + "\n")
        created = True
    return read_api_key(path), created


def read_api_key(path: Path) -> str:
    """The API key kept in `path`; ConfigError (one line) if it is missing, unreadable, not a
    key, or readable by others."""
    try:
        mode = path.stat().st_mode
        text = path.read_bytes().decode("ascii").strip()
    except FileNotFoundError:
        raise ConfigError(
            f"no API key file {path}: give --api-key, or start the transceiver with "
            "authentication on (it creates the file)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not ASCII"
        raise ConfigError(
            f"cannot read the API key file {path} ({why}): fix it, or delete it for a new one"
        ) from None
    if mode & 0o077:
        raise ConfigError(f"API key file {path} is readable by others: chmod 600 {path}")
    return check_api_key(text, f"the API key in {path}")


# Client tokens ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientToken:
    value: str  # what the browser sends: Authorization: Bearer <value>
    expires_at: int  # unix seconds
    nonce: bytes  # 12 random bytes: the token's identity


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ClientTokens:
    """Mints and opens client tokens for one API key."""

    def __init__(self, api_key: str) -> None:
        self._key = hmac.new(api_key.encode(), _TOKEN_KEY_LABEL, hashlib.sha256).digest()

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_TAG_SIZE]

    def mint(
        self, now: float, lifetime: float = DEFAULT_TOKEN_LIFETIME, nonce: bytes | None = None
    ) -> ClientToken:
        """A token valid until `now + lifetime` (whole seconds, rounded up)."""
        expires_at = int(-(-(now + lifetime) // 1))
        nonce = os.urandom(12) if nonce is None else nonce
        body = _BODY.pack(_VERSION, expires_at, nonce)
        return ClientToken(TOKEN_PREFIX + _b64(body + self._tag(body)), expires_at, nonce)

    def open(self, value: str) -> ClientToken:
        """The token `value` names if this key minted it (expired or not); AuthError if not."""
        raw = _unb64(value[len(TOKEN_PREFIX) :]) if value.startswith(TOKEN_PREFIX) else None
        if raw is None or len(raw) != _TOKEN_SIZE or raw[0] != _VERSION:
            raise AuthError(401, "token_malformed", "malformed client token")
        body, tag = raw[: _BODY.size], raw[_BODY.size :]
        if not hmac.compare_digest(tag, self._tag(body)):
            raise AuthError(401, "token_forged", "client token not minted with this API key")
        _, expires_at, nonce = _BODY.unpack(body)
        return ClientToken(value, expires_at, nonce)


def _unb64(text: str) -> bytes | None:
    if not text or len(text) > 64 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


class UsedTokens:
    """Nonces of tokens that placed their call, each remembered until its token expires.
    Bounded: when full, the entry closest to expiry is forgotten first."""

    def __init__(self, capacity: int = USED_TOKENS_CAPACITY) -> None:
        self.capacity = capacity
        self._nonces: set[bytes] = set()
        self._by_expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._nonces)

    def __contains__(self, token: ClientToken) -> bool:
        return token.nonce in self._nonces

    def claim(self, token: ClientToken, now: float) -> bool:
        """Mark `token` used; False if it was used already."""
        self._forget_expired(now)
        if token.nonce in self._nonces:
            return False
        while len(self._nonces) >= self.capacity:
            self._nonces.discard(heapq.heappop(self._by_expiry)[1])
        self._nonces.add(token.nonce)
        heapq.heappush(self._by_expiry, (token.expires_at, token.nonce))
        return True

    def _forget_expired(self, now: float) -> None:
        heap = self._by_expiry
        while heap and heap[0][0] < now:
            self._nonces.discard(heapq.heappop(heap)[1])


# Access policy ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    """Who sent a request: "anonymous", "api_key" or "client_token" (with its token)."""

    kind: str
    token: ClientToken | None = None


ANONYMOUS = Caller("anonymous")
API_KEY_CALLER = Caller("api_key")
NEED_CREDENTIAL = "send Authorization: Bearer <API key or client token>"


class Access:
    """The signaling access policy; `api_key` None turns authentication off (every request
    is allowed, as on loopback by default)."""

    def __init__(self, api_key: str | None, used_capacity: int = USED_TOKENS_CAPACITY) -> None:
        self.enabled = api_key is not None
        self._api_key = (api_key or "").encode()
        self.tokens = ClientTokens(api_key) if api_key is not None else None
        self.used = UsedTokens(used_capacity)
        self._grants: dict[str, bytes] = {}  # call id -> nonce of the token that placed it
        self._prune_at = GRANTS_PRUNE_AT

    def caller(self, authorization: str | None, query_token: str | None = None) -> Caller:
        """Who the credential names (`Authorization` header, else a `?token=` value);
        ANONYMOUS without one. AuthError(401) for a credential that is wrong."""
        if not self.enabled:
            return ANONYMOUS
        if authorization is not None:
            scheme, _, credential = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise AuthError(401, "unauthorized", NEED_CREDENTIAL)
            credential = credential.strip()
        elif query_token:
            credential = query_token
        else:
            return ANONYMOUS
        if credential.startswith(TOKEN_PREFIX):
            assert self.tokens is not None
            return Caller("client_token", self.tokens.open(credential))
        if hmac.compare_digest(credential.encode(), self._api_key):
            return API_KEY_CALLER
        raise AuthError(401, "unauthorized", "wrong API key")

    def require_api_key(self, caller: Caller) -> None:
        """Operator endpoints (/v1/stats, minting client tokens): the API key only."""
        if not self.enabled or caller.kind == "api_key":
            return
        if caller.kind == "anonymous":
            raise AuthError(401, "unauthorized", "send Authorization: Bearer <API key>")
        raise AuthError(403, "forbidden", "a client token cannot do this: use the API key")

    def may_create(self, caller: Caller, now: float) -> None:
        """May `caller` place a call now? Checks only: `claim` spends the token once the call
        is placed (call both with no `await` between them)."""
        if not self.enabled or caller.kind == "api_key":
            return
        token = caller.token
        if token is None:
            raise AuthError(401, "unauthorized", NEED_CREDENTIAL)
        if token.expires_at < now:
            raise AuthError(401, "token_expired", "client token expired: mint a new one")
        if token in self.used:
            raise AuthError(401, "token_used", "client token already used: mint a new one")

    def claim(self, caller: Caller, now: float) -> None:
        """Spend the client token that just placed a call (single use)."""
        if caller.token is not None:
            self.used.claim(caller.token, now)

    def grant(self, call_id: str, caller: Caller, live: Callable[[str], bool]) -> None:
        """The call `call_id` was placed by `caller`: its token may use the call from now on.
        `live(call_id)` says whether a call still exists (grants of ended calls are pruned)."""
        if caller.token is None:
            return
        if len(self._grants) >= self._prune_at:
            self._grants = {c: n for c, n in self._grants.items() if live(c)}
            self._prune_at = max(GRANTS_PRUNE_AT, 2 * len(self._grants))
        self._grants[call_id] = caller.token.nonce

    def may_use(self, caller: Caller, call_id: str) -> None:
        """May `caller` read, follow or end the call `call_id`? Expiry does not matter here:
        the token that placed a call stays its key for the call's life."""
        if not self.enabled or caller.kind == "api_key":
            return
        if caller.token is None:
            raise AuthError(401, "unauthorized", NEED_CREDENTIAL)
        nonce = self._grants.get(call_id)
        if nonce is None or not hmac.compare_digest(nonce, caller.token.nonce):
            raise AuthError(403, "forbidden", "this client token did not place this call")

    def forget(self, call_id: str) -> None:
        self._grants.pop(call_id, None)

    @property
    def grants(self) -> int:
        return len(self._grants)


def token_lifetime(requested: object) -> int:
    """A requested client-token lifetime (seconds), checked; AuthError(400) if unusable."""
    if requested is None:
        return DEFAULT_TOKEN_LIFETIME
    if (
        isinstance(requested, bool)
        or not isinstance(requested, int | float)
        or not 1 <= requested <= MAX_TOKEN_LIFETIME
    ):
        raise AuthError(400, "bad_request", f"expires_in must be 1-{MAX_TOKEN_LIFETIME} seconds")
    return int(requested)


# CORS -------------------------------------------------------------------------------------------
CORS_METHODS = "GET, POST, DELETE"
CORS_HEADERS = "Authorization, Content-Type"
CORS_EXPOSE = "Location, ETag, Retry-After"
CORS_MAX_AGE = "600"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(text: str) -> str:
    """`scheme://host[:port]` as browsers send it in `Origin` (lower case, no default port);
    ConfigError naming `--cors-origin` otherwise."""
    problem = f"--cors-origin {text!r} is not an origin: write e.g. https://app.example.com"
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(problem) from None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(problem)
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    suffix = f":{port}" if port is not None and port != _DEFAULT_PORTS[parts.scheme] else ""
    return f"{parts.scheme}://{host}{suffix}"


def parse_origins(values: str | Iterable[str]) -> tuple[str, ...]:
    """Origins from repeated and/or comma-separated values, normalized, duplicates dropped."""
    origins: dict[str, None] = {}
    for value in [values] if isinstance(values, str) else values:
        for item in value.split(","):
            if item.strip():
                origins[parse_origin(item)] = None
    return tuple(origins)


class CorsPolicy:
    """Cross-origin access by allow-list: allowed origins get CORS headers, others none."""

    def __init__(self, origins: Iterable[str] = ()) -> None:
        self.origins = frozenset(origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and origin in self.origins

    def preflight(self, origin: str | None) -> dict[str, str] | None:
        """Headers answering an OPTIONS preflight from `origin`; None if it is not allowed."""
        if not self.allows(origin):
            return None
        assert origin is not None
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": CORS_HEADERS,
            "Access-Control-Max-Age": CORS_MAX_AGE,
            "Vary": "Origin",
        }

    def response_headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an actual response to `origin` (none if it is not allowed)."""
        if not self.allows(origin):
            return {}
        assert origin is not None
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": CORS_EXPOSE,
            "Vary": "Origin",
        }
