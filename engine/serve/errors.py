"""Every error the server answers, and the one table mapping exceptions to HTTP statuses."""
import logging

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from ..engine import FeatureUnavailable, UnknownItem
from ..state import StorageUnavailable

log = logging.getLogger("recscore.serve")


class ApiError(Exception):
    """A request refused with `status`: {"error": code, "detail": detail}."""

    def __init__(self, status, code, detail, headers=None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class Overloaded(Exception):
    """More requests in flight than the server admits."""


# Exception class -> (status, error code); the first entry matching the exception's class wins.
STATUS_OF = (
    (UnknownItem, 404, "unknown_item"),
    (FeatureUnavailable, 501, "feature_unavailable"),
    (Overloaded, 503, "overloaded"),
    (StorageUnavailable, 503, "storage_unavailable"),
    (TimeoutError, 504, "timeout"),
    (TypeError, 422, "invalid_request"),
    (ValueError, 422, "invalid_request"),
)


def error_body(code, detail):
    return {"error": code, "detail": detail}


def error_response(request, exc):
    """The JSON answer to any exception an endpoint raises."""
    if isinstance(exc, ApiError):
        return JSONResponse(error_body(exc.code, exc.detail), exc.status, headers=exc.headers)
    if isinstance(exc, HTTPException):
        return JSONResponse(error_body("http_error", exc.detail), exc.status_code, headers=exc.headers)
    for cls, status, code in STATUS_OF:
        if isinstance(exc, cls):
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return JSONResponse(error_body(code, detail or code), status)
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal", "internal server error"), 500)


EXCEPTION_HANDLERS = {Exception: error_response, HTTPException: error_response}
