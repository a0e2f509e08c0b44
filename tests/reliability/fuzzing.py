"""Schema-driven fuzzing of a running frontend: schemathesis builds requests from its ``/openapi.json``
(valid ones, and with ``negative`` deliberately invalid ones) and every answer is checked for two things:
no 5xx, and every error body OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``).

Used by ``tests/reliability/test_fuzz.py`` (a short run in CI) and ``bench/fuzz.py`` (a long one). Failures
are collected, not raised inside hypothesis, so a run reports every distinct problem it met (no shrinking).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import GenerationMode

ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error_problem(body: bytes) -> str:
    """Why ``body`` is not an OpenAI error body ("" when it is one)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return "error body is not JSON"
    if not isinstance(obj, dict) or set(obj) != {"error"} or not isinstance(obj["error"], dict):
        return "error body is not {'error': {...}}"
    err = obj["error"]
    if set(err) != ERROR_KEYS:
        return f"error object has keys {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return "error message/type are not non-empty strings"
    if not (err["param"] is None or isinstance(err["param"], str)):
        return "error param is neither null nor a string"
    if not (err["code"] is None or isinstance(err["code"], str)):
        return "error code is neither null nor a string"
    return ""


@dataclass
class Problem:
    operation: str
    mode: str
    status: int
    why: str
    request: str
    response: str


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    messages: Counter[str] = field(default_factory=Counter)  # 4xx answers by operation, status and message
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    def distinct_problems(self) -> list[Problem]:
        seen: dict[tuple[str, int, str], Problem] = {}
        for p in self.problems:
            seen.setdefault((p.operation, p.status, p.why), p)
        return list(seen.values())

    def summary(self) -> dict[str, Any]:
        return {"cases": self.cases, "statuses": dict(sorted(self.statuses.items())),
                "server_errors": self.server_errors, "problems": len(self.problems),
                "per_operation": dict(self.per_operation), "seconds": round(self.seconds, 1)}


_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "min_tokens", "top_k", "seed", "logprobs",
               "top_logprobs")
_ROLES = ("system", "user", "assistant", "developer")


def _repair(case: Any, model: str, level: int) -> Any:
    """Level 0-1: a servable body around the random fields; 2: only the model named; 3: untouched."""
    body = case.body
    if level == 3 or not isinstance(body, dict):
        return case
    body = {**body, "model": model}
    if level <= 1:
        for k in _INT_FIELDS:  # JSON Schema's integer admits 2.0; the server wants 2
            v = body.get(k)
            if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
                body[k] = int(v)
        for k in ("max_tokens", "max_completion_tokens"):  # bounded work per case (n may be 16)
            if isinstance(body.get(k), int) and body[k] > 256:
                body[k] = 256
        if "messages" in body or "prompt" not in body:
            msgs = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") in _ROLES
                    and isinstance(m.get("content"), str)]
            body["messages"] = msgs or [{"role": "user", "content": "hello"}]
            body.pop("prompt", None)
        else:
            pr = body["prompt"]
            if not (isinstance(pr, str) and pr) and not (isinstance(pr, list) and pr and
                                                          all(isinstance(x, str) and x for x in pr)):
                body["prompt"] = "hello"
            if not isinstance(body.get("logprobs"), int) or not 0 <= body["logprobs"] <= 5:
                body.pop("logprobs", None)
    case.body = body
    return case


def anthropic_error_problem(body: bytes) -> str:
    """Why ``body`` is not an Anthropic error body ``{"type": "error", "error": {"type", "message"}}``."""
    try:
        obj = json.loads(body)
    except ValueError:
        return "error body is not JSON"
    if not isinstance(obj, dict) or obj.get("type") != "error" or not isinstance(obj.get("error"), dict):
        return "error body is not {'type': 'error', 'error': {...}}"
    err = obj["error"]
    if set(err) != {"type", "message"} or not all(isinstance(err[k], str) and err[k] for k in err):
        return f"error object is not {{type, message}} strings: {sorted(err)}"
    return ""


def _excerpt(data: Any, limit: int = 600) -> str:
    text = data if isinstance(data, str) else json.dumps(data, default=repr)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def fuzz(base_url: str, *, examples: int, get_examples: int = 10, negative: bool = True, model: str | None = None,
         seed: int | None = None, request_timeout: float = 60.0, headers: dict[str, str] | None = None) -> FuzzReport:
    """Fuzz every operation of the frontend at ``base_url``: ``examples`` cases per POST operation and mode
    (positive, and negative when asked), ``get_examples`` per GET operation. With ``model``, three in four
    positive bodies name that model."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    report = FuzzReport()
    t0 = time.monotonic()
    session = requests.Session()
    modes = [GenerationMode.POSITIVE, *([GenerationMode.NEGATIVE] if negative else [])]
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        n = examples if op.method.upper() == "POST" else get_examples
        for mode in modes:
            if mode is GenerationMode.NEGATIVE and op.method.upper() != "POST":
                continue  # GET routes take no body: negative cases are path/query junk the router 404s
            _run_operation(op, label, mode, n, base_url, session, report, seed, request_timeout, headers, model)
    report.seconds = time.monotonic() - t0
    return report


def _run_operation(op: Any, label: str, mode: GenerationMode, n: int, base_url: str,
                   session: requests.Session, report: FuzzReport, seed: int | None, request_timeout: float,
                   headers: dict[str, str] | None, model: str | None) -> None:
    strategy = op.as_strategy(generation_mode=mode)
    if model is not None and mode is GenerationMode.POSITIVE and op.method.upper() == "POST":
        # The published schema is looser than what the server accepts (a random model name is a 404, an
        # empty message list a 400...), so most raw cases stop at validation. Half the cases are repaired
        # into servable requests (random fields kept), a quarter only name the model, a quarter stay raw:
        # validation, the tokenizer, the router, the workers and the response paths all get fuzzed.
        strategy = hypothesis.strategies.tuples(strategy, hypothesis.strategies.integers(0, 3)).map(
            lambda pair: _repair(pair[0], model, pair[1]))

    @settings(max_examples=n, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
              verbosity=hypothesis.Verbosity.quiet)
    @hypothesis.given(case=strategy)
    def run(case: Any) -> None:
        try:
            resp = case.call(base_url=base_url, session=session, headers=headers, timeout=request_timeout)
        except requests.RequestException as exc:  # no answer at all: as bad as a 5xx
            report.cases += 1
            report.statuses[599] += 1
            report.problems.append(Problem(label, mode.value, 599, f"no response: {type(exc).__name__}",
                                           _excerpt(case.body), str(exc)[:300]))
            return
        report.cases += 1
        report.per_operation[label] += 1
        status = resp.status_code
        report.statuses[status] += 1
        why = ""
        if status >= 500:
            why = "server error"
        elif status >= 400:
            # /v1/messages is Anthropic's API: its errors have Anthropic's shape.
            why = anthropic_error_problem(resp.content) if op.path == "/v1/messages" else \
                openai_error_problem(resp.content)
        if status >= 400 and status < 500:
            try:
                report.messages[f"{mode.value} {label} {status} {resp.json()['error']['message'][:70]}"] += 1
            except (ValueError, KeyError, TypeError):
                pass
        if why:
            report.problems.append(Problem(label, mode.value, status, why, _excerpt(case.body),
                                           _excerpt(resp.text)))

    if seed is not None:
        run = hypothesis.seed(seed)(run)
    run()
