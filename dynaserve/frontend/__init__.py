"""OpenAI-compatible HTTP front end of a DynaServe cluster (``python -m dynaserve.frontend``).

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
See docs/frontend.md for parameters, errors and metrics.
"""

from __future__ import annotations

from dynaserve.frontend.config import FrontendConfig

__all__ = ["FrontendConfig"]
