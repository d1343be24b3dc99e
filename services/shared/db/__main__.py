"""CLI: `python -m services.shared.db upgrade|downgrade|current [REVISION] [--url URL]`."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy.engine import make_url

from services.shared.db.engine import DATABASE_URL_ENV, default_database_url
from services.shared.db.migrate import current, downgrade, head_revision, upgrade


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.shared.db", description="Migrate the Magnus log database."
    )
    parser.add_argument("action", choices=("upgrade", "downgrade", "current"))
    parser.add_argument(
        "revision",
        nargs="?",
        help='target revision (default: "head" for upgrade, "base" for downgrade)',
    )
    parser.add_argument(
        "--url", default=None, help=f"database URL (default: ${DATABASE_URL_ENV} or var/magnus.db)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    url = args.url or default_database_url()
    shown_url = make_url(url).render_as_string(hide_password=True)
    if args.action == "current":
        if args.revision is not None:
            print("current takes no revision", file=sys.stderr)
            return 2
        print(f"{shown_url}: at revision {current(url) or '<none>'} (head is {head_revision()})")
        return 0
    before = current(url)
    if args.action == "upgrade":
        upgrade(url, args.revision or "head")
    else:
        downgrade(url, args.revision or "base")
    after = current(url)
    print(f"{shown_url}: {args.action}d from {before or '<none>'} to {after or '<none>'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
