"""``python -m dynaserve.keys DIR --clients NAME... --workers ID...``: write CURVE key pairs.

Writes the broker's key pair, one per client name (``DIR/clients``) and one per worker instance id
(``DIR/workers``); secret files get mode 0600, directories 0700. See :mod:`dynaserve.security` for the
layout and what to copy to which host.
"""

from __future__ import annotations

import argparse

from dynaserve.security import generate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dynaserve-keygen", description="Create DynaServe CURVE keys")
    parser.add_argument("directory", help="key directory (created if missing)")
    parser.add_argument("--clients", nargs="*", default=["client"], help="client names (default: client)")
    parser.add_argument("--workers", nargs="*", default=[], help="worker instance ids, e.g. w0 w1")
    parser.add_argument("--force", action="store_true", help="replace existing key files")
    ns = parser.parse_args(argv)
    try:
        root = generate(ns.directory, ns.clients, ns.workers, force=ns.force)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))
    print(f"keys in {root}: broker, clients {ns.clients}, workers {ns.workers}")


if __name__ == "__main__":
    main()
