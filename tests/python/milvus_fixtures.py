"""A real Milvus standalone server for the tests: ``milvus-server`` from the ``milvus`` package,
one per test session, on free localhost ports in a temp data dir, stopped (its whole process
group) at the end. If it cannot start, the tests that need it fail with its log: never skip.

Milvus 2.3 binds its gRPC, etcd and metrics ports on every interface, with no setting to narrow
it. So the server runs in a user + network namespace of its own (``unshare``), which has nothing
but its own loopback, and netns_forward.py relays one port, bound on this machine's 127.0.0.1, to
its proxy: nothing else it opens is reachable, and its ports cannot collide with another
session's. Where unprivileged namespaces are not allowed, it runs directly instead (every port
still chosen here, etcd's through a config file, except the metrics port that the ``milvus``
wrapper picks from 9091) and says so in its log; ``isolated`` tells which.
"""

from __future__ import annotations

import itertools
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_WITHIN_S = 240.0  # first start unpacks the engine's binaries; a bound, not a timing assertion
_PORTS = ("proxy", "root-coord", "proxy-internal", "query-coord", "query-node", "index-coord", "index-node",
          "data-coord", "data-node")
_names = itertools.count()


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _log_tail(root: Path, limit: int = 6000) -> str:
    parts = []
    for f in sorted(root.glob("**/*.log")):
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        parts.append(f"--- {f.relative_to(root)} ---\n{text[-limit:]}")
    return "\n".join(parts) or "(no log written)"


_UNSHARE = ("unshare", "--user", "--map-root-user", "--net")
_FORWARD = Path(__file__).with_name("netns_forward.py")


@functools.cache
def namespace_refusal() -> str | None:
    """Why this machine cannot give the server a network namespace of its own (None: it can)."""
    if shutil.which("unshare") is None:
        return "no `unshare` command (util-linux)"
    probe = subprocess.run([*_UNSHARE, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`{' '.join(_UNSHARE)} true` failed: {probe.stderr.strip() or probe.returncode}"
    return None


class MilvusProcess:
    """One ``milvus-server`` process group and where it listens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.refusal = namespace_refusal()
        self.isolated = self.refusal is None
        listener = None
        if self.isolated:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
        ports = _free_ports(len(_PORTS) + 2)
        if listener is not None:  # inside the namespace every port is free: the proxy takes the relayed one
            ports[0] = listener.getsockname()[1]
        self.port = ports[0]
        etcd, peer = ports[-2], ports[-1]
        (root / "etcd.yaml").write_text(
            "name: tailrank-test\n"
            f"listen-client-urls: http://127.0.0.1:{etcd}\nadvertise-client-urls: http://127.0.0.1:{etcd}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\ninitial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: tailrank-test=http://127.0.0.1:{peer}\n"
        )
        args = [sys.executable, "-c", "from milvus import main; main()", "--data", str(root / "data"),
                "--etcd-port", str(etcd),
                # Strong reads wait for the next time tick (200 ms by default): shorter ticks keep
                # the many small reads of the tests quick; nothing else depends on it.
                "--extra-config", "proxy.timeTickInterval=20"]
        for name, port in zip(_PORTS, ports):
            args += [f"--{name}-port", str(port)]
        env = dict(os.environ, ETCD_CONFIG_PATH=str(root / "etcd.yaml"))
        self.log = open(root / "milvus-server.log", "w")  # noqa: SIM115 - closed in stop()
        pass_fds: tuple[int, ...] = ()
        if listener is not None:
            args = [*_UNSHARE, sys.executable, str(_FORWARD), "--listen-fd", str(listener.fileno()),
                    "--port", str(self.port), "--", *args]
            pass_fds = (listener.fileno(),)
        else:
            self.log.write(f"[tailrank test fixture] not isolated, every port on all interfaces: {self.refusal}\n")
            self.log.flush()
        # A session of its own: the wrapper runs the engine as a child, and stop() ends them all.
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=root, pass_fds=pass_fds)
        if listener is not None:
            listener.close()  # the relay holds its own copy

    @property
    def uri_base(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        from pymilvus import MilvusClient

        end = time.monotonic() + READY_WITHIN_S
        last: BaseException | None = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"milvus-server exited with {self.proc.returncode} before it was ready:\n"
                            f"{_log_tail(self.root)}", pytrace=False)
            try:
                c = MilvusClient(uri=f"http://127.0.0.1:{self.port}", timeout=3)
                c.list_collections()
                c.close()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.5)
        self.stop()
        pytest.fail(f"milvus-server did not answer within {READY_WITHIN_S:.0f} s ({last}):\n{_log_tail(self.root)}",
                    pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
        try:  # the engine may outlive the wrapper by a moment
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusProcess]:
    server = MilvusProcess(tmp_path_factory.mktemp("milvus"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def milvus_uri(server: MilvusProcess, stem: str = "t") -> str:
    """A fresh collection URI on the session's server (unique per call)."""
    return f"{server.uri_base}/{stem}_{os.getpid()}_{next(_names)}"
