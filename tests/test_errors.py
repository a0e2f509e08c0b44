"""dynamo_rt.errors: one tree, one status and OpenAI error type per code, the same words on the wire."""

from __future__ import annotations

import pytest

from dynamo_rt import errors
from frontend.serving import error_body


@pytest.mark.parametrize(("exc", "status", "type_", "code"), [
    (errors.InvalidRequest("x"), 400, "invalid_request_error", "invalid_request"),
    (errors.Unauthorized("invalid or missing API key"), 401, "authentication_error", "invalid_api_key"),
    (errors.NotFound("x"), 404, "not_found_error", "not_found"),
    (errors.Overloaded("x"), 429, "rate_limit_error", "overloaded"),
    (errors.Unavailable("x"), 503, "service_unavailable", "unavailable"),
    (errors.DeadlineExceeded("x"), 504, "timeout", "timeout"),
    (errors.internal(KeyError("secret detail")), 500, "internal_error", "internal"),
])  # fmt: skip
def test_each_error_maps_to_one_status_and_openai_body(exc: errors.DynamoError, status: int, type_: str,
                                                       code: str) -> None:
    assert exc.status == status
    assert error_body(exc) == {"error": {"message": exc.message, "type": type_, "param": None, "code": code}}


def test_internal_errors_name_the_type_not_the_text() -> None:
    assert errors.internal(KeyError("secret detail")).message == "internal error: KeyError"


def test_from_wire_rebuilds_the_class() -> None:
    e = errors.from_wire("invalid_api_key", "no key")
    assert type(e) is errors.Unauthorized and (e.status, e.message) == (401, "no key")
    assert type(errors.from_wire("no-such-code", "m")) is errors.RemoteError
