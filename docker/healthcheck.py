#!/usr/bin/env python3
"""Container probe: does the server in this container answer GET /health?

    subspec-healthcheck          ready: 200 `ok` (Docker's HEALTHCHECK)
    subspec-healthcheck --live   alive: any answer but `failed` (a 503 while loading, restarting, stalled or
                                 draining is a server at work: a Kubernetes liveness probe must not kill it)

It asks the port the entry point wrote to SUBSPEC_PORT_FILE (so `docker run IMAGE --port 9000` is probed on
9000), else $PORT, else 8000. Exit status 0 passes, 1 fails.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def served_port() -> str:
    try:
        with open(os.environ.get("SUBSPEC_PORT_FILE") or "/tmp/subspec.port") as f:
            return f.read().strip()
    except OSError:
        return os.environ.get("PORT") or "8000"


def main(argv: list[str]) -> int:
    live = argv == ["--live"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{served_port()}/health", timeout=4):
            return 0
    except urllib.error.HTTPError as exc:  # a 503 with the reason in `status`
        try:
            status = json.loads(exc.read()).get("status")
        except ValueError:
            status = None
        print(f"/health {exc.code}: {status}")
        return 0 if live and exc.code == 503 and status != "failed" else 1
    except OSError as exc:  # nothing listening, or no answer in time
        print(f"/health: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
