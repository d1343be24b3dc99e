"""One logging format for every service, so interleaved logs of `make run` stay readable."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format=f"%(asctime)s {service:9s} %(levelname)-7s %(name)s: %(message)s",
        force=True,
    )
