#!/usr/bin/env python3
"""Build the tiny Llama-shaped model and tokenizer (see dynaserve/tinymodel.py).

    python scripts/build_tiny_model.py [--out .models/tiny-llama] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynaserve.tinymodel import DEFAULT_OUT, build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if the model exists")
    ns = p.parse_args(argv)
    print(f"tiny model ready in {build(ns.out, ns.seed, ns.force)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
