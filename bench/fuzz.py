"""Long schema fuzzing of the frontend: schemathesis against ``/openapi.json`` of a live stack.

Our etcd + nats-server (embedded), one mocker worker at ``--speedup 0`` and a frontend. Every operation of
the published schema gets ``--examples`` valid and ``--examples`` invalid requests (GET routes fewer; see
tests/reliability/fuzzing.py for the generation and the checks). Two things are checked on every answer:
no 5xx (nor a dropped connection), and every 4xx body is an OpenAI error ``{"error": {"message", "type",
"param", "code"}}``. The short version of this run is tests/reliability/test_fuzz.py (in CI).

Prints a table of answers and each distinct problem with a request that shows it; the LAST line is JSON:
``{"bench": "fuzz", "ours": <distinct problems>, "baseline": null, "ratio": null, "unit": "problems",
"cases": ..., "server_errors": ..., "server_error_share": ..., "cases_per_s": ...}``. A fuzz run checks a
property (no 5xx, every 4xx an OpenAI error body); nothing else answers the same cases, so there is no
baseline and no ratio, and the line says so instead of printing a constant (it printed ``"baseline": 0``).
Run: ``.venv/bin/python bench/fuzz.py [--examples 1000] [--seed N]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    PY,
    Proc,
    Services,
    cleanup,
    exit_on_sigterm,
    free_port,
    ours_env,
    plot_bars,
    say,
    table,
    wait_model,
)
from bench._common import report as report_line
from dynamo_rt.local import commands
from tests.reliability.fuzzing import fuzz

MODEL = "dynamo-tiny"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="cases per POST operation and mode")
    ap.add_argument("--get-examples", type=int, default=100, help="cases per GET operation")
    ap.add_argument("--seed", type=int, default=None, help="fixed hypothesis seed (default: random)")
    args = ap.parse_args()
    exit_on_sigterm()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Services() as s, cleanup([]) as procs:
        env = ours_env(s.etcd_url, s.nats_url, "fuzz")
        procs.append(Proc("fuzz-worker", commands.worker("mocker", "agg", "tiny", extra=["--speedup", "0"],
                                                         python=PY), env))
        procs.append(Proc("fuzz-frontend", commands.frontend(port, python=PY), env))
        wait_model(url, MODEL, procs)
        say(f"fuzzing {url}: {args.examples} cases per POST operation and mode, {args.get_examples} per GET")
        report = fuzz(url, examples=args.examples, get_examples=args.get_examples, model=MODEL, seed=args.seed)
        alive = all(p.alive() for p in procs)
        tracebacks = procs[-1].log_path.read_text(errors="replace").count("Traceback")
    summary = report.summary()
    rows = [[f"HTTP {status}", n] for status, n in sorted(report.statuses.items())]
    rows += [["cases", report.cases], ["seconds", report.seconds], ["tracebacks in frontend log", tracebacks],
             ["stack alive at end", alive]]
    print(table(["answer", "count"], rows, first_width=30))
    print("per operation:", json.dumps(summary["per_operation"]))
    print("most frequent 4xx answers:")
    for key, n in report.messages.most_common(15):
        print(f"  {n:5d}  {key}")
    problems = report.distinct_problems()
    for p in problems[:20]:
        print(f"PROBLEM {p.operation} [{p.mode}] -> {p.status}: {p.why}\n  request: {p.request}\n"
              f"  response: {p.response}")
    say("PASS" if not problems and alive and not tracebacks else "FAIL")
    plot_bars("fuzz", f"fuzz: answers to {report.cases} schema cases",
              {f"HTTP {status}": {"answers": float(n)} for status, n in sorted(report.statuses.items())}, "answers")
    report_line({"bench": "fuzz", "ours": len(problems), "baseline": None, "ratio": None, "unit": "problems",
                 "cases": report.cases, "server_errors": report.server_errors,
                 "server_error_share": round(report.server_errors / max(1, report.cases), 6),
                 "cases_per_s": round(report.cases / max(1e-9, report.seconds), 1)})
    return 0 if not problems and alive and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
