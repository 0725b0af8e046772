"""Run a server in a network namespace of its own and forward one localhost port to it.

    unshare --user --map-root-user --net python netns_forward.py --listen-fd FD --port P -- CMD...

The namespace has nothing but its own loopback, so whatever CMD binds (Milvus binds its gRPC,
etcd and metrics ports on every interface) is reachable from nowhere. ``--listen-fd`` is a socket
the caller bound on 127.0.0.1 *before* entering the namespace: a socket stays in the namespace it
was made in, so connections accepted on it come from the caller's localhost, and each one is
relayed to 127.0.0.1:P inside. The relay exits with CMD's exit status.
"""

from __future__ import annotations

import argparse
import fcntl
import socket
import struct
import subprocess
import sys
import threading

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """A new namespace's ``lo`` is down; bring it up without needing iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:  # half-close so the other direction can finish, then let both go
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _relay(client: socket.socket, port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:  # not listening yet: the client sees a closed connection and retries
        client.close()
        return
    upstream.settimeout(None)
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_relay, args=(client, port), daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    loopback_up()
    listener = socket.socket(fileno=a.listen_fd)
    child = subprocess.Popen(cmd)  # same process group: the caller's killpg ends both
    threading.Thread(target=_serve, args=(listener, a.port), daemon=True).start()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
