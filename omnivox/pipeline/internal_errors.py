"""Internal failures as a client sees them: a generic message carrying an error id. The details (the exception and
its traceback, CUDA or driver text, paths) go to the server log under the same id, so that an operator can find them
from a client's report without the client learning anything about the server."""

from __future__ import annotations

import logging
import secrets

INTERNAL_ERROR_CODE = "internal_error"


def report_internal_error(
    logger: logging.Logger, context: str, exc: BaseException, public: str = "internal server error"
) -> str:
    """Log `exc` under a new error id; return the message a client may see: `public` and the id."""
    error_id = f"err_{secrets.token_hex(6)}"
    logger.error("%s [error id %s]", context, error_id, exc_info=exc)
    return f"{public} (error id {error_id})"
