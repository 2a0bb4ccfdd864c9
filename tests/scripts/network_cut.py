"""Run inside a fresh network namespace (``unshare -n``): stream to a client whose network then
vanishes, and print (JSON) when the server's generator ended.

Server and client share the namespace's loopback; ``ip link set lo down`` mid-stream drops every
packet both ways, as a lost Wi-Fi or a dropped NAT entry does: no FIN, no RST. Argument: a
directory for the server's log. ``SEND_TIMEOUT`` in the environment overrides the 2 s default
(0 shows what happens without it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import requests

from tests.live import gunicorn


def link(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


def main() -> None:
    link("up")
    send_timeout = float(os.environ.get("SEND_TIMEOUT", "2"))
    config = {"SSE_RUN_KEEPALIVE": 0.5, "SSE_RUN_SEND_TIMEOUT": send_timeout}
    with gunicorn(tmp_path=Path(sys.argv[1]), config=config) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        body = b'{"seconds": 3600}'
        sock.sendall(
            b"POST /sleeper HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        while b"data: start" not in data:
            data += sock.recv(4096)
        link("down")
        cut = time.time()
        # The access log gets the request's line when the server has ended it.
        deadline = time.monotonic() + float(os.environ.get("WAIT", "40"))
        while '"POST /sleeper' not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        link("up")
        seen = requests.get(f"{srv.url}/stats", timeout=10).json()
        sock.close()
    print(
        json.dumps(
            {
                "finally": seen["finally"],
                "disconnected": seen["disconnected_in_finally"],
                "ended_after_cut": round(seen["last_finally"] - cut, 2) if seen["finally"] else None,
            }
        )
    )


if __name__ == "__main__":
    main()
