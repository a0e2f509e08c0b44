"""Load predictors: the next interval's request rate, prompt and output lengths from the intervals seen.

:class:`~planner.core.Planner` feeds each series one value per interval and asks for the next; ``constant``,
``moving-average`` and ``linear`` ship here, and ``--predictor module:factory`` plugs in any object with
``add`` and ``predict`` (:class:`Predictor`).
"""

from __future__ import annotations

import importlib
from collections import deque
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from dynamo_rt.errors import InvalidRequest


@runtime_checkable
class Predictor(Protocol):
    """Predicts the next value of a series from the values seen so far. Plug-ins implement this."""

    def add(self, value: float) -> None: ...

    def predict(self) -> float | None: ...


class ConstantPredictor:
    """The next value is the last one."""

    def __init__(self, window: int = 1) -> None:
        self._last: float | None = None

    def add(self, value: float) -> None:
        self._last = value

    def predict(self) -> float | None:
        return self._last


class MovingAveragePredictor:
    """The next value is the mean of the last ``window`` values."""

    def __init__(self, window: int = 5) -> None:
        if window < 1:
            raise InvalidRequest("predictor window must be at least 1", param="predictor_window")
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self._values.append(value)

    def predict(self) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None


class LinearTrendPredictor:
    """Least-squares line through the last ``window`` values, extended one step; never below zero.

    A ramp is met where it will be, not where it was; with fewer than two values it is a constant.
    """

    def __init__(self, window: int = 5) -> None:
        if window < 2:
            raise InvalidRequest("the linear predictor needs a window of at least 2", param="predictor_window")
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self._values.append(value)

    def predict(self) -> float | None:
        return self.predict_ahead(1)

    def predict_ahead(self, steps: int) -> float | None:
        """The line ``steps`` intervals past the last value (1: the next interval)."""
        n = len(self._values)
        if n == 0:
            return None
        if n == 1:
            return self._values[0]
        xm = (n - 1) / 2
        ym = sum(self._values) / n
        sxx = sum((x - xm) ** 2 for x in range(n))
        sxy = sum((x - xm) * (y - ym) for x, y in enumerate(self._values))
        slope = sxy / sxx
        return max(0.0, ym + slope * (n - 1 + steps - xm))


PREDICTORS: dict[str, Callable[[int], Predictor]] = {
    "constant": ConstantPredictor,
    "moving-average": MovingAveragePredictor,
    "linear": LinearTrendPredictor,
}


def make_predictor(spec: str, window: int) -> Predictor:
    """A predictor by name (``constant``, ``moving-average``, ``linear``) or plug-in ``module:factory``;
    the factory is called with the window and must return an object with ``add`` and ``predict``."""
    factory = PREDICTORS.get(spec)
    if factory is None:
        if ":" not in spec:
            raise InvalidRequest(f"unknown predictor {spec!r}: one of {sorted(PREDICTORS)} or module:factory",
                                 param="predictor")
        mod_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidRequest(f"cannot load predictor {spec!r}: {exc}", param="predictor") from None
    pred = factory(window)
    if not isinstance(pred, Predictor):
        raise InvalidRequest(f"predictor {spec!r} has no add()/predict()", param="predictor")
    return pred
