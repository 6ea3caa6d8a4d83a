"""Docker HEALTHCHECK of the plcsense image: GET /healthz where the worker's own config says it listens.

The config file is the one the worker runs with (``--config`` on PID 1's command line, else
/etc/plcsense/config.yaml, or the path given as argument), read by the worker's settings loader, so
``metrics.port``/``metrics.host`` in the file and ``PLCSENSE_METRICS__*`` in the container's environment count
exactly as they do for the worker. Exit 0 when healthy, 1 when not (Docker's convention).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/plcsense/config.yaml")
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}


def config_from_cmdline(args: list[str]) -> Path:
    """The ``--config`` of a ``plcsense serve`` command line, else the image's default config."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return DEFAULT_CONFIG


def worker_cmdline(pid: int = 1) -> list[str]:
    """The worker's command line: in the container it is PID 1 (the entrypoint execs it)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def healthz_url(host: str, port: int) -> str:
    """Where to ask: a wildcard bind address is reached on loopback."""
    host = _ANY_ADDRESS.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{host}:{port}/healthz"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = Path(args[0]) if args else config_from_cmdline(worker_cmdline())
    from plcsense.worker.settings import load_settings  # after argument handling: the import costs ~0.3 s

    try:
        metrics = load_settings(config).metrics
    except Exception as exc:  # any unreadable config: unhealthy, and say why in `docker inspect`
        print(f"unhealthy: cannot read {config}: {exc}")
        return 1
    if not metrics.port:
        print("metrics.port is 0: the worker serves no /healthz, nothing to check")
        return 0
    url = healthz_url(metrics.host, metrics.port)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            print(response.read().decode(errors="replace").strip())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}: {exc.read().decode(errors='replace').strip()}")
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
