"""The project's errors. Each knows its HTTP status and crosses Ray process boundaries intact.

Errors raised inside actors or Serve replicas are pickled back to the caller; defining
``__reduce__`` keeps the subclass and its fields instead of a generic ``RayTaskError`` payload
(the pattern of Ray Train v2 ``api/exceptions.py``). The HTTP ingress maps ``http_status``
to the response code (the pattern of Feast ``errors.py``).
"""

from __future__ import annotations

from typing import Any


class IntentrecError(Exception):
    """Base of every error intentrec raises on purpose.

    Args:
        message: What happened and what to do about it, for a person.
        field: The input field at fault, when there is one (``"events[3].item_id"``).
    """

    http_status: int = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.field))

    def to_dict(self) -> dict[str, Any]:
        """JSON body for an HTTP error response."""
        body: dict[str, Any] = {"error": type(self).__name__, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class DataError(IntentrecError):
    """Input data (an events or items file) is malformed: names the file, column and fix."""

    http_status = 400


class ConfigError(IntentrecError):
    """A configuration value is invalid."""

    http_status = 400


class BadRequestError(IntentrecError):
    """A request is well-formed JSON but asks for something impossible."""

    http_status = 422


class UnauthorizedError(IntentrecError):
    """An endpoint that needs an API key was called without one, or with a key nobody issued."""

    http_status = 401


class ForbiddenError(IntentrecError):
    """A valid API key without the scope the endpoint needs (the client key on an admin one)."""

    http_status = 403


class NotFoundError(IntentrecError):
    """The thing asked for does not exist (an item id, a model version)."""

    http_status = 404


class ConflictError(IntentrecError):
    """A request conflicts with an earlier one (an ``Idempotency-Key`` reused for another body)."""

    http_status = 409


class PayloadTooLargeError(IntentrecError):
    """A request body over the server's limit (refused before it is read)."""

    http_status = 413


class ArtifactError(IntentrecError):
    """A model artifact is missing or incomplete."""

    http_status = 503


class UnavailableError(IntentrecError):
    """A backing component is temporarily unavailable; the client may retry."""

    http_status = 503
