#!/usr/bin/env python3
"""Create CURVE keys for a broker, its clients and its workers: ``scripts/keygen.py DIR --workers w0 w1``.

The same as ``python -m dynaserve.keys``; see dynaserve/security.py for the directory layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dynaserve.keys import main  # noqa: E402

if __name__ == "__main__":
    main()
