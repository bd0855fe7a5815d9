"""`relayctl call` against signaling that requires authentication: refused without a token,
connected with one minted by `relayctl token`."""

from __future__ import annotations

import os
import subprocess

from tests.e2e.conftest import UpStack
from tests.support.procs import RELAYCTL


def test_call_needs_a_token_and_gets_through_with_one(tmp_path):
    stack = UpStack(tmp_path / "state", extra=["--require-auth"]).start()
    env = {**os.environ, "VOICERELAY_STATE_DIR": str(stack.state_dir)}
    env.pop("VOICERELAY_TOKEN", None)
    try:
        refused = subprocess.run(
            [*RELAYCTL, "call", stack.url, "--seconds", "0.5"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert refused.returncode == 1 and "401" in refused.stdout, refused.stdout
        minted = subprocess.run(
            [*RELAYCTL, "token", stack.url], capture_output=True, text=True, env=env, timeout=30
        )
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        call = subprocess.run(
            [*RELAYCTL, "call", stack.url, "--seconds", "0.5", "--token", token],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert call.returncode == 0 and "came back" in call.stdout, call.stdout + call.stderr
    finally:
        stack.cleanup()
