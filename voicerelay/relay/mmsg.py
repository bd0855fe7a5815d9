"""Batched UDP I/O for the relay: `recvmmsg`/`sendmmsg` from libc through cffi's ABI mode.

One system call moves up to `size` datagrams each way, which is where a Python forwarder's
time goes otherwise (a recvmsg and a sendmsg per packet, plus an EAGAIN per wake-up). No
compiled extension: cffi opens the running process's libc. Peers are raw `struct sockaddr`
bytes as the kernel writes them (see `voicerelay.wire.addr.sockaddr`), so the hot path never
formats an address string.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import cffi

_ffi = cffi.FFI()
_ffi.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    struct msghdr {
        void *msg_name; unsigned int msg_namelen;
        struct iovec *msg_iov; size_t msg_iovlen;
        void *msg_control; size_t msg_controllen; int msg_flags;
    };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    int recvmmsg(int, struct mmsghdr *, unsigned int, int, void *);
    int sendmmsg(int, struct mmsghdr *, unsigned int, int);
    """
)
_libc = _ffi.dlopen(None)
MSG_DONTWAIT = 0x40
NAME_SIZE = 28  # sizeof(struct sockaddr_in6), the larger of the two families

Route = Callable[[bytes, bytes, float], "tuple[bytes, bytes] | None"]
"""A routing decision: (datagram, peer, now) -> (peer to send to, datagram) or None."""
Key = TypeVar("Key", bound=Hashable)  # what `put_all` looks peers up by


class DatagramBatch:
    """`size` slots of (datagram, peer) in C memory, filled by `recv` or `put`, sent by `send`.

    `namelen` is the socket family's sockaddr size (16 for IPv4, 28 for IPv6): one batch serves
    one socket. A datagram longer than `slot` arrives truncated to `slot` bytes, so a slot one
    byte longer than the largest accepted datagram makes oversize ones detectable by length.
    """

    def __init__(self, size: int, slot: int, namelen: int) -> None:
        self.size, self.slot, self.namelen = size, slot, namelen
        self.msgs = _ffi.new("struct mmsghdr[]", size)
        self.iov = _ffi.new("struct iovec[]", size)
        self._data = _ffi.new("char[]", size * slot)
        self._names = _ffi.new("char[]", size * NAME_SIZE)
        self.data = _ffi.buffer(self._data)
        self.names = _ffi.buffer(self._names)
        # Flat views of the headers: memoryview item access is cheaper than cffi attributes.
        self._msg_lens = memoryview(_ffi.buffer(self.msgs)).cast("I")
        self._iov_lens = memoryview(_ffi.buffer(self.iov)).cast("Q")
        self._len_at = _ffi.offsetof("struct mmsghdr", "msg_len") // 4
        self._len_stride = _ffi.sizeof("struct mmsghdr") // 4
        self._iov_len_at = _ffi.offsetof("struct iovec", "iov_len") // 8
        self._iov_stride = _ffi.sizeof("struct iovec") // 8
        self._peer_in_slot: list[bytes | None] = [None] * size  # skips rewriting a same peer
        self._peers_cached = False  # set once the batch has held peers to send to
        for i in range(size):
            self.iov[i].iov_base = self._data + i * slot
            self.iov[i].iov_len = slot
            hdr = self.msgs[i].msg_hdr
            hdr.msg_name = self._names + i * NAME_SIZE
            hdr.msg_namelen = namelen
            hdr.msg_iov = self.iov + i
            hdr.msg_iovlen = 1

    def recv(self, fd: int) -> int:
        """Receive up to `size` queued datagrams without blocking; 0 when none are queued.

        Raises OSError for errors other than EAGAIN.
        """
        if self._peers_cached:  # the kernel rewrites the names: forget what we wrote there
            self._peer_in_slot[:] = [None] * self.size
            self._peers_cached = False
        n = _libc.recvmmsg(fd, self.msgs, self.size, MSG_DONTWAIT, _ffi.NULL)
        if n < 0:
            err = _ffi.errno
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        return n

    def datagram(self, i: int) -> tuple[bytes, bytes]:
        """Received slot `i` as (datagram, peer sockaddr)."""
        start, name = i * self.slot, i * NAME_SIZE
        length = self._msg_lens[i * self._len_stride + self._len_at]
        return self.data[start : start + length], self.names[name : name + self.namelen]

    def received(self, n: int) -> list[tuple[bytes, bytes]]:
        """Received slots 0..n-1 as (datagram, peer sockaddr) pairs (`datagram`, in one loop)."""
        data, names, slot, namelen = self.data, self.names, self.slot, self.namelen
        lens, len_at, len_stride = self._msg_lens, self._len_at, self._len_stride
        return [
            (
                data[i * slot : i * slot + lens[i * len_stride + len_at]],
                names[i * NAME_SIZE : i * NAME_SIZE + namelen],
            )
            for i in range(n)
        ]

    def put_all(
        self, items: Sequence[tuple[bytes, Key]], peers: Mapping[Key, bytes]
    ) -> tuple[int, int]:
        """Fill slots from 0 with `items` of (datagram, key), each to the sockaddr `peers[key]`
        (`put`, in one loop; KeyError for a key `peers` lacks). A datagram longer than a slot
        is left out. Returns (slots filled, datagrams left out); at most `size` items."""
        data, names, slot = self.data, self.names, self.slot
        lens, stride, at = self._iov_lens, self._iov_stride, self._iov_len_at
        in_slot = self._peer_in_slot
        self._peers_cached = True
        m = skipped = 0
        for datagram, key in items[: self.size]:
            size = len(datagram)
            if size > slot:
                skipped += 1
                continue
            peer = peers[key]
            start = m * slot
            data[start : start + size] = datagram
            if in_slot[m] is not peer:
                name = m * NAME_SIZE
                names[name : name + len(peer)] = peer
                in_slot[m] = peer
            lens[m * stride + at] = size
            m += 1
        return m, skipped

    def put(self, i: int, datagram: bytes, peer: bytes) -> None:
        """Fill slot `i` for sending (`datagram` must fit the slot; `peer` is a sockaddr)."""
        start, name = i * self.slot, i * NAME_SIZE
        self.data[start : start + len(datagram)] = datagram
        self.names[name : name + len(peer)] = peer
        self._peer_in_slot[i] = peer
        self._peers_cached = True
        self._iov_lens[i * self._iov_stride + self._iov_len_at] = len(datagram)

    def route_into(self, n: int, route: Route, out: DatagramBatch, now: float) -> int:
        """Pass received slots 0..n-1 through `route`; what it returns fills `out` from slot 0.
        Returns how many slots of `out` to send. (`datagram` and `put`, fused for speed.)"""
        data, names, slot, namelen = self.data, self.names, self.slot, self.namelen
        lens, len_at, len_stride = self._msg_lens, self._len_at, self._len_stride
        o_data, o_names, o_slot = out.data, out.names, out.slot
        o_lens, o_at, o_stride = out._iov_lens, out._iov_len_at, out._iov_stride
        o_peers = out._peer_in_slot
        out._peers_cached = True
        m = 0
        for i in range(n):
            start, name = i * slot, i * NAME_SIZE
            routed = route(
                data[start : start + lens[i * len_stride + len_at]],
                names[name : name + namelen],
                now,
            )
            if routed is not None:
                peer, datagram = routed
                size = len(datagram)
                start, name = m * o_slot, m * NAME_SIZE
                o_data[start : start + size] = datagram
                if o_peers[m] is not peer:
                    o_names[name : name + len(peer)] = peer
                    o_peers[m] = peer
                o_lens[m * o_stride + o_at] = size
                m += 1
        return m

    def send(self, fd: int, count: int) -> tuple[int, int]:
        """Send slots 0..count-1; returns (sent, failed). A datagram the kernel refuses
        (bad address) is skipped; a full socket buffer drops the rest, as UDP would."""
        sent = failed = 0
        msgs = self.msgs
        while sent + failed < count:
            done = sent + failed
            k = _libc.sendmmsg(fd, msgs + done, count - done, MSG_DONTWAIT)
            if k > 0:
                sent += k
                continue
            err = _ffi.errno
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                failed += count - done
            else:
                failed += 1
        return sent, failed
