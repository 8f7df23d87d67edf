"""Is the node on this machine up? The containers' health check: ``python -m dicom_node.probe --config FILE``
exits 0 when the node's ``GET /health`` answers 200, else 1 with the reason in one line (2: a bad config).

Every role serves ``/health`` on its web port (the web role with the whole API, the others alone). This module
imports the settings, not the models and servers of ``dicom-node``, so that a probe takes about a second rather
than the node's start-up imports (ten on a busy machine, past a health check's timeout).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path

from dicom_node.config import ConfigError, Settings, load_settings

PROBE_TIMEOUT = 5.0
_EVERY_INTERFACE = {"", "0.0.0.0", "::"}


def health_problem(settings: Settings) -> str | None:
    """None when the node's ``GET /health`` answers 200 (index reachable, workers running), else why not."""
    host = "127.0.0.1" if settings.web.host in _EVERY_INTERFACE else settings.web.host
    url = f"http://{host}:{settings.web.port}/health"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError as error:
        return f"{url}: {error}"
    return None if status == 200 else f"{url} answered {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML configuration file")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as error:
        print(f"dicom-node probe: {error}", file=sys.stderr)
        return 2
    problem = health_problem(settings)
    if problem is not None:
        print(f"dicom-node probe: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
