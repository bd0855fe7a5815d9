"""Compiling `program.bpf.c` with clang, once per source, compiler and architecture: the object
is cached under the relay's state directory."""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from voicerelay.relay.fastpath import FastPathUnavailable

SOURCE = Path(__file__).with_name("program.bpf.c")
INSTALL = "apt install clang libbpf-dev"


def arch_include() -> str | None:
    """The multiarch include directory holding <asm/types.h> (Debian's layout), if any."""
    for candidate in sorted(glob.glob("/usr/include/*-linux-gnu*")):
        if os.path.exists(os.path.join(candidate, "asm", "types.h")):
            return candidate
    return None


def object_file(cache_dir: Path) -> Path:
    """The compiled program (built now if not cached); FastPathUnavailable if it cannot be."""
    clang = shutil.which("clang")
    if clang is None:
        raise FastPathUnavailable(f"clang not found ({INSTALL})")
    if not os.path.exists("/usr/include/bpf/bpf_helpers.h"):
        raise FastPathUnavailable(f"libbpf headers not found ({INSTALL})")
    include = arch_include()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode() + str(include).encode())
    target = cache_dir / f"fastpath-{digest.hexdigest()[:16]}.o"
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if target.exists():
            return target
    except OSError as exc:
        why = f"cannot use {cache_dir} ({exc.strerror}): check --state-dir"
        raise FastPathUnavailable(why) from None
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [clang, "-O2", "-g", "-target", "bpf", "-c", str(SOURCE), "-o", str(partial)]
    if include:
        command[1:1] = ["-I", include]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        errors = [line for line in done.stderr.splitlines() if "error" in line] or ["?"]
        raise FastPathUnavailable(f"compiling the program failed: {errors[0].strip()}")
    os.replace(partial, target)
    return target
