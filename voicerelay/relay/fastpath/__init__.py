"""The kernel fast path (opt-in, `--kernel-fast-path`): established client flows forwarded by a
tc eBPF program (`program.bpf.c`) without waking a worker.

- `layout`: the program's map keys and values, as bytes (pure);
- `build`: compiling the program with clang, once per source and compiler;
- `libbpf`: the few libbpf calls used, through ctypes;
- `kernel`: loading, attaching, renewing and detaching the program (the launcher's), and the
  flow map as a worker sees it;
- `sync`: a worker's bridge between its router and the flow map.

The router stays the single source of truth: it decides which flows the kernel forwards
(answered UDP flows over IPv4) and when they end; the kernel only counts and forwards.
"""


class FastPathUnavailable(Exception):
    """The kernel fast path cannot run here; the message says why and what would fix it (one
    line). The relay then forwards everything in userspace."""
