"""Ray nodes started with ``ray start`` for a test, and stopped again without touching anyone else's Ray.

Each test gives its nodes a unique temp dir; every process of those nodes carries that dir in its
command line, so stopping kills exactly those processes (``ray stop`` would stop every Ray on the
machine). Ports are free ones picked here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"


def node_temp_dir(prefix: str) -> Path:
    """A fresh temp dir for a test's nodes (its name marks their processes); the test is skipped when
    this venv has no ``ray`` executable. Short, under /tmp: Ray's socket paths have a length limit."""
    import pytest

    if not RAY.is_file():
        pytest.skip(f"no `ray` executable next to {sys.executable}")
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports(head: bool) -> dict[str, int]:
    """Free ports for every listener a node opens (a head also has GCS, client and dashboard ports)."""
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    if head:
        names += ["--port", "--dashboard-port", "--ray-client-server-port"]
    return {n: free_port() for n in names}


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def pids_of(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (the nodes' unique temp dir)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            out.append(int(proc.name))
    return out


def stop_nodes(marker: str) -> None:
    """SIGTERM, then SIGKILL, exactly the processes of the nodes started with temp dir ``marker``."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids_of(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while pids_of(marker) and time.time() < deadline:
            time.sleep(0.3)


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - localhost
        return json.loads(r.read().decode())
