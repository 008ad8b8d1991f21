"""Domain errors the engine and the API raise; ``server.app`` maps each to one HTTP status."""

from __future__ import annotations


class ServingError(Exception):
    """Base class. ``type`` and ``param`` go into the error body ``{"error": {...}}``."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ServingError):
    status = 401
    type = "authentication_error"


class PayloadTooLarge(ServingError):
    status = 413
    type = "invalid_request_error"


class Overloaded(ServingError):
    """The queue is full: try again after ``retry_after`` seconds."""

    status = 429
    type = "overloaded_error"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class Draining(ServingError):
    """Shutting down: in-flight requests finish, new ones go elsewhere."""

    status = 503
    type = "unavailable_error"


class DeadlineExceeded(ServingError):
    status = 504
    type = "timeout_error"


class EngineDead(ServingError):
    """The engine stopped (the model is unusable): this replica must be restarted (/health is 503)."""

    status = 503
    type = "engine_error"


class RequestFailed(ServingError):
    """One request failed inside the engine and was dropped alone; the server goes on serving."""

    status = 500
    type = "server_error"
