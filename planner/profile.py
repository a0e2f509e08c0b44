"""The per-replica performance profile of one engine configuration: TTFT versus prompt length, ITL versus
concurrency (one curve per context length), as ``dynamo-rt profile`` measures it (:mod:`planner.profiler`)
and writes it (``dynamo-rt-profile/1`` JSON); shipped profiles live in ``planner/data/profiles/``.

:mod:`planner.sla` sizes pools from it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_rt.errors import InvalidRequest

PROFILE_FORMAT = "dynamo-rt-profile/1"
PROFILES_DIR = Path(__file__).resolve().parent / "data" / "profiles"


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly past both ends (never below 0)."""
    if len(xs) == 1:
        return ys[0]
    i = bisect.bisect_left(xs, x)
    i = min(max(i, 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return max(y, 0.0)


@dataclass(frozen=True, slots=True)
class DecodeCurve:
    context_length: float  # tokens of context per sequence the curve was measured at
    concurrency: tuple[float, ...]
    itl_s: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    """Per-replica performance of one engine configuration: prefill TTFT versus input length, decode ITL
    versus concurrency (one curve per context length). Times are seconds of the profiled engine."""

    prefill_isl: tuple[float, ...]
    prefill_ttft_s: tuple[float, ...]
    decode: tuple[DecodeCurve, ...]
    max_concurrency: int | None = None  # the engine's running-sequence limit (max_num_seqs)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_curve("prefill", self.prefill_isl, self.prefill_ttft_s)
        if not self.decode:
            raise InvalidRequest("profile has no decode curve")
        for c in self.decode:
            _check_curve("decode", c.concurrency, c.itl_s)
        ctx = [c.context_length for c in self.decode]
        if ctx != sorted(set(ctx)):
            raise InvalidRequest("profile decode curves must have increasing context lengths")

    # -- queries

    def ttft(self, isl: float) -> float:
        """TTFT of a lone request of ``isl`` prompt tokens."""
        return _interp(self.prefill_isl, self.prefill_ttft_s, isl)

    def itl(self, concurrency: float, context_length: float | None = None) -> float:
        """Inter-token latency of one replica running ``concurrency`` sequences."""
        curves = self.decode
        if context_length is None or len(curves) == 1:
            c = curves[0]
            return _interp(c.concurrency, c.itl_s, concurrency)
        ctxs = [c.context_length for c in curves]
        vals = [_interp(c.concurrency, c.itl_s, concurrency) for c in curves]
        return _interp(ctxs, vals, context_length)

    def concurrency_for_itl(self, target: float, context_length: float | None = None,
                            correction: float = 1.0) -> float:
        """Most sequences one replica can run with ``itl * correction <= target``; 0 if not even one."""
        def f(c: float) -> float:
            return self.itl(c, context_length) * correction

        if f(1.0) > target:
            return 0.0
        hi_cap = float(self.max_concurrency) if self.max_concurrency else 1e6
        lo, hi = 1.0, 2.0
        while hi < hi_cap and f(hi) <= target:
            lo, hi = hi, hi * 2
        hi = min(hi, hi_cap)
        if f(hi) <= target:
            return hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if f(mid) <= target:
                lo = mid
            else:
                hi = mid
        return lo

    def scaled(self, speedup: float) -> Profile:
        """The same engine running ``speedup`` times faster (the mocker's ``--speedup``)."""
        if speedup <= 0:
            raise InvalidRequest("engine speedup must be > 0", param="engine_speedup")
        return Profile(
            prefill_isl=self.prefill_isl,
            prefill_ttft_s=tuple(t / speedup for t in self.prefill_ttft_s),
            decode=tuple(DecodeCurve(c.context_length, c.concurrency, tuple(t / speedup for t in c.itl_s))
                         for c in self.decode),
            max_concurrency=self.max_concurrency,
            meta={**self.meta, "scaled_by_speedup": speedup},
        )

    # -- JSON

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise InvalidRequest(f"not a {PROFILE_FORMAT} profile (format {data.get('format')!r})")
        try:
            pre = data["prefill"]
            curves = tuple(
                DecodeCurve(float(d["context_length"]), tuple(float(x) for x in d["concurrency"]),
                            tuple(float(x) for x in d["itl_s"]))
                for d in data["decode"]
            )
            mc = data.get("max_concurrency")
            return cls(
                prefill_isl=tuple(float(x) for x in pre["isl"]),
                prefill_ttft_s=tuple(float(x) for x in pre["ttft_s"]),
                decode=curves,
                max_concurrency=int(mc) if mc else None,
                meta={k: v for k, v in data.items() if k not in ("prefill", "decode")},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed profile: {exc!r}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.meta, "format": PROFILE_FORMAT}
        out["prefill"] = {"isl": list(self.prefill_isl), "ttft_s": list(self.prefill_ttft_s)}
        out["decode"] = [{"context_length": c.context_length, "concurrency": list(c.concurrency),
                          "itl_s": list(c.itl_s)} for c in self.decode]
        if self.max_concurrency:
            out["max_concurrency"] = self.max_concurrency
        return out

    @classmethod
    def load(cls, ref: str | Path) -> Profile:
        """A profile file, or the name of a shipped one (``mocker`` -> data/profiles/mocker.json)."""
        path = Path(ref)
        if not path.is_file():
            shipped = PROFILES_DIR / f"{ref}.json"
            if not shipped.is_file():
                names = sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
                raise InvalidRequest(f"no profile file {ref!r} and no shipped profile of that name "
                                     f"(shipped: {names})", param="profile")
            path = shipped
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"cannot read profile {path}: {exc}", param="profile") from None
        return cls.from_dict(data)


def _check_curve(name: str, xs: Sequence[float], ys: Sequence[float]) -> None:
    if not xs or len(xs) != len(ys):
        raise InvalidRequest(f"profile {name} curve needs equally many x and y values (got {len(xs)}, {len(ys)})")
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise InvalidRequest(f"profile {name} curve x values must increase")
    if any(y <= 0 or not math.isfinite(y) for y in ys):
        raise InvalidRequest(f"profile {name} curve times must be positive")
