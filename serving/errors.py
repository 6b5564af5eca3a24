"""The one error of the serving API: :class:`RequestError`, raised wherever a request is refused
(the model set, the job manager, the routes) and answered by one responder in
:mod:`serving.api` as ``{"error": <code>, "detail": <message>}`` with its HTTP status.

Between a replica and the ingress it travels as an answer (:meth:`RequestError.to_answer`,
undone by :meth:`RequestError.check`): an exception raised in a replica reaches the ingress
wrapped in Ray's error types, which the ingress must answer as a 5xx.
"""

from __future__ import annotations

from typing import Any

#: The only key of a refusal's answer: a result never has it.
_ANSWER_KEY = "request_error"


class RequestError(Exception):
    """A request the API answers with HTTP ``status_code`` (a 4xx, or 503 for a dependency that
    is down), machine-readable ``error`` and human-readable ``detail`` (a message, or a list of
    ``{loc, msg}`` as validation errors have)."""

    def __init__(self, status_code: int, error: str, detail: Any) -> None:
        super().__init__(detail)
        self.status_code, self.error, self.detail = int(status_code), error, detail

    def to_answer(self) -> dict[str, Any]:
        return {_ANSWER_KEY: {"status_code": self.status_code, "error": self.error, "detail": self.detail}}

    @classmethod
    def check(cls, answer: Any) -> Any:
        """``answer`` as it is, or the :class:`RequestError` it carries raised."""
        if isinstance(answer, dict) and _ANSWER_KEY in answer:
            raise cls(**answer[_ANSWER_KEY])
        return answer

    def __reduce__(self):
        return type(self), (self.status_code, self.error, self.detail)
