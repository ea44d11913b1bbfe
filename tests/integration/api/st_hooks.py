"""Schemathesis hooks for tests/integration/api/test_openapi_fuzz.py (loaded through
SCHEMATHESIS_HOOKS by the ``st`` process): deploy uploads are bytes."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.serializer("application/gzip")
def gzip_body(ctx: Any, value: Any) -> dict[str, Any]:
    """A generated upload body as raw bytes (the API answers 400/415/422 for junk)."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8")
    return {"data": data}
