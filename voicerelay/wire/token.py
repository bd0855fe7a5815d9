"""The routing token: the server's ICE ufrag, sealed with AES-GCM so it can be neither forged
nor read by a client.

Raw layout (format 2): `key id (1) | nonce (12) | AES-GCM(issued u32 | cluster id u16 |
family u8 | port u16 | IP 4/16) | tag (16)`, with `format version | key id` as associated
data; written in the standard base64 alphabet without padding, which is inside ICE's ice-chars
(RFC 8839). An IPv4 route is 56 characters, an IPv6 one 72. The random nonce doubles as the
per-session nonce, so every ufrag is unique.

`issued` is wall-clock seconds (the relay and the transceiver that sealed the token may be
different hosts, so no monotonic clock would do): the relay refuses a token whose first use
comes too long after it was issued. Format 1 tokens carried no time; they are told apart by
their length, checked under their own associated data, and refused as `old-format`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from voicerelay.wire.addr import Addr

FORMAT_VERSION = 2
OLD_FORMAT_VERSION = 1  # no issue time: refused, but still recognised
NONCE_SIZE = 12
TAG_SIZE = 16
MIN_LENGTH = 4
MAX_LENGTH = 256
MAX_ISSUED = 2**32 - 1
_ICE_CHARS = re.compile(rb"[A-Za-z0-9+/]+")
_ISSUED = struct.Struct("!I")
_ROUTE = struct.Struct("!HBH")
_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE
# Raw sizes by format: the sealed route is 4 (IPv4) or 16 (IPv6) bytes of IP after the header.
_SIZES = {
    _OVERHEAD + _ISSUED.size + _ROUTE.size + 4: FORMAT_VERSION,
    _OVERHEAD + _ISSUED.size + _ROUTE.size + 16: FORMAT_VERSION,
    _OVERHEAD + _ROUTE.size + 4: OLD_FORMAT_VERSION,
    _OVERHEAD + _ROUTE.size + 16: OLD_FORMAT_VERSION,
}


class TokenError(ValueError):
    """A token does not open; `reason` is alphabet, length, key-id, seal or old-format (a
    genuine token of format 1, which carries no issue time: `route` then holds what it names,
    with `issued_at` None, so a relay can still recognise a call that was already bound)."""

    def __init__(self, reason: str, detail: str = "", route: Route | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.route = route


@dataclass(frozen=True)
class Route:
    """What a token carries: which cluster, which transceiver, the session nonce, and when it
    was issued (wall-clock seconds, whole)."""

    cluster_id: int
    transceiver: Addr
    nonce: bytes
    issued_at: int | None  # None only in an old-format token's TokenError

    def fresh(self, wall_now: float, window: float) -> bool:
        """Is `wall_now` within `window` seconds of the issue time, either side (the hosts'
        clocks may differ a little)? The time is whole seconds, truncated: the token was issued
        within the second after `issued_at`."""
        issued = self.issued_at
        return issued is not None and issued - window <= wall_now <= issued + 1 + window


class TokenKeys:
    """The cluster's shared secrets by key id; `current` seals, every listed key opens."""

    def __init__(self, keys: dict[int, bytes], current: int) -> None:
        if current not in keys:
            raise ValueError(f"current key id {current} is not among the keys")
        for kid, key in keys.items():
            if not 0 <= kid <= 255:
                raise ValueError(f"key id {kid} is out of range 0-255")
            if len(key) not in (16, 24, 32):
                raise ValueError(f"key {kid} must be 16, 24 or 32 bytes")
        self._aeads = {kid: AESGCM(key) for kid, key in keys.items()}
        self.current = current

    @property
    def key_ids(self) -> list[int]:
        return sorted(self._aeads)

    def seal(self, cluster_id: int, transceiver: Addr, issued_at: float | None = None) -> str:
        """A fresh token routing to `transceiver` in `cluster_id`, issued at `issued_at`
        (wall-clock seconds; default: now). Raises ValueError for an issue time out of u32."""
        issued = int(time.time() if issued_at is None else issued_at)
        if not 0 <= issued <= MAX_ISSUED:
            raise ValueError(f"issue time {issued} is out of range 0-{MAX_ISSUED}")
        host, port = transceiver
        ip = ipaddress.ip_address(host)
        plain = _ISSUED.pack(issued) + _ROUTE.pack(cluster_id, ip.version, port) + ip.packed
        nonce = os.urandom(NONCE_SIZE)
        kid = bytes([self.current])
        sealed = self._aeads[self.current].encrypt(nonce, plain, bytes([FORMAT_VERSION]) + kid)
        return base64.b64encode(kid + nonce + sealed).rstrip(b"=").decode("ascii")

    def open(self, token: str | bytes) -> Route:
        """The route inside a token; raises only `TokenError`."""
        raw = _decode_text(token)
        version = _SIZES.get(len(raw))
        if version is None:
            raise TokenError("length")
        kid = raw[0]
        aead = self._aeads.get(kid)
        if aead is None:
            raise TokenError("key-id", str(kid))
        nonce = raw[1 : 1 + NONCE_SIZE]
        try:
            plain = aead.decrypt(nonce, raw[1 + NONCE_SIZE :], bytes([version, kid]))
        except InvalidTag:
            raise TokenError("seal") from None
        if version == OLD_FORMAT_VERSION:
            route = _route(plain, nonce, None)
            raise TokenError("old-format", "the token carries no issue time", route)
        (issued,) = _ISSUED.unpack_from(plain)
        return _route(plain[_ISSUED.size :], nonce, issued)


def _route(plain: bytes, nonce: bytes, issued: int | None) -> Route:
    """The route in a token's opened content (after the issue time, if any)."""
    cluster_id, family, port = _ROUTE.unpack_from(plain)
    ip_bytes = plain[_ROUTE.size :]
    if family == 4 and len(ip_bytes) == 4:
        host = str(ipaddress.IPv4Address(ip_bytes))
    elif family == 6 and len(ip_bytes) == 16:
        host = str(ipaddress.IPv6Address(ip_bytes))
    else:  # only a holder of the key could produce this
        raise TokenError("seal", "bad route")
    return Route(cluster_id, (host, port), nonce, issued)


def _decode_text(token: str | bytes) -> bytes:
    """The raw bytes of a token's text: canonical unpadded base64 in ICE's alphabet."""
    raw_text = token.encode("ascii", "replace") if isinstance(token, str) else bytes(token)
    if not MIN_LENGTH <= len(raw_text) <= MAX_LENGTH:
        raise TokenError("length")
    if not _ICE_CHARS.fullmatch(raw_text):
        raise TokenError("alphabet")
    if len(raw_text) % 4 == 1:
        raise TokenError("length")
    try:
        raw = base64.b64decode(raw_text + b"=" * (-len(raw_text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise TokenError("alphabet") from None
    if base64.b64encode(raw).rstrip(b"=") != raw_text:
        raise TokenError("alphabet", "non-canonical base64")
    return raw


def load_keys(path: str | os.PathLike[str]) -> TokenKeys:
    """Read a secret file: lines `<key id 0-255> <64 hex chars>`; the first line seals."""
    p = Path(path)
    expected = "'<key id 0-255> <64 hex digits>'"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenError(
            "secret",
            f"secret file {p} does not exist: create it with `relayctl start` or --secret-file",
        ) from None
    except UnicodeDecodeError:
        raise TokenError(
            "secret",
            f"secret file {p} is not text (not UTF-8): it must hold lines {expected}; "
            "point --secret-file at the cluster's secret",
        ) from None
    except OSError as exc:
        raise TokenError("secret", f"cannot read secret file {p}: {exc.strerror}") from None
    keys: dict[int, bytes] = {}
    current: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            kid = int(parts[0])
            key = bytes.fromhex(parts[1])
            if len(parts) != 2 or not 0 <= kid <= 255 or len(key) != 32:
                raise ValueError
        except (ValueError, IndexError):
            raise TokenError("secret", f"{p}:{number}: expected {expected}") from None
        keys[kid] = key
        if current is None:
            current = kid
    if current is None:
        raise TokenError("secret", f"secret file {p} has no key: add a line '<key id> <64 hex>'")
    return TokenKeys(keys, current)


def write_new_secret(path: str | os.PathLike[str], key_id: int = 0) -> TokenKeys:
    """Create a secret file with one fresh 256-bit key (mode 0600) and return its keys."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{key_id} {key.hex()}\n")
    return TokenKeys({key_id: key}, key_id)
