"""The Node.js client's own tests (`node --test` in clients/node), run against servers
they start themselves with this interpreter (`ADSVC_PYTHON`). `npm ci` installs the
pinned dependencies first when they are missing or older than package-lock.json.
Skipped where node/npm are not installed, except in CI (`CI` set), where that fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"
TIMEOUT = 600  # seconds for npm ci + node --test together


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI (clients/node tests)")
        pytest.skip("node/npm are not installed")
    return node, npm


def _installed() -> bool:
    marker = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    return marker.exists() and marker.stat().st_mtime >= lock.stat().st_mtime


def _run(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=NODE_DIR, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:  # subprocess.run kills the child
        pytest.fail(f"{' '.join(cmd)} took longer than {timeout:.0f} s:\n{e.stdout}\n{e.stderr}")


def test_node_client():
    node, npm = _tools()
    env = {**os.environ, "ADSVC_PYTHON": sys.executable}
    env.pop("NODE_OPTIONS", None)
    start = time.monotonic()
    if not _installed():
        r = _run([npm, "ci", "--no-audit", "--no-fund"], TIMEOUT, env)
        assert r.returncode == 0, f"npm ci failed:\n{r.stdout}\n{r.stderr}"
    left = max(60.0, TIMEOUT - (time.monotonic() - start))
    r = _run([node, "--test", "--test-reporter=tap"], left, env)
    assert r.returncode == 0, f"node --test failed:\n{r.stdout}\n{r.stderr}"
    assert "# fail 0" in r.stdout and "# pass " in r.stdout, r.stdout
