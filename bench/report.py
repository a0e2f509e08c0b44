"""Runs the benches for ``make bench`` and turns their JSON lines into the README's benchmark table.

Not a bench itself. Two steps:

* ``report.py run [NAME ...]`` runs every bench (or the ones named: ``transport_rtt reference_engine``),
  one after the other, each with its output shown and kept in ``bench/out/logs/<name>.out``, and writes
  ``bench/out/results.jsonl``: a first line ``{"run": {"date", "commit", "python", "subset"}}`` (``subset``:
  the benches named, empty for all; the table then says it is partial), then per bench its
  LAST output line (the one JSON object every bench ends with: ``bench``, ``ours``, ``baseline``,
  ``ratio``, ``unit``, ``machine``) plus ``script``, ``rc`` and ``seconds``; a bench that ended without
  one gets ``{"script", "rc", "seconds", "error"}``. Exit status 1 if any bench failed (the others still run).
* ``report.py write [RESULTS]`` renders that file as a Markdown table, headed by the run's date, commit and
  machine (the CPU, usable cores, vector ISA and the native decode kernel, from the benches' ``machine``),
  and puts it between the ``<!-- bench-table:begin -->`` / ``<!-- bench-table:end -->`` markers of
  README.md and bench/README.md. Nothing is typed in by hand, so the table is always one run's figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = BENCH / "out"
RESULTS = OUT / "results.jsonl"
BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"
READMES = (ROOT / "README.md", BENCH / "README.md")
NOT_BENCHES = {"_common", "report"}


def benches() -> list[str]:
    """Every bench script's name (bench/*.py but the helpers), sorted."""
    return sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in NOT_BENCHES and not p.stem.startswith("_"))


def last_json(output: str) -> dict[str, Any] | None:
    """The bench's result: its last non-empty output line when that is a JSON object, else None."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        got = json.loads(lines[-1])
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def run_one(name: str, python: str = sys.executable) -> dict[str, Any]:
    """Run bench/<name>.py, echo and keep its output; its result line plus script, rc and seconds."""
    log = OUT / "logs" / f"{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    lines: list[str] = []
    with subprocess.Popen([python, str(BENCH / f"{name}.py")], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc, log.open("w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            f.write(line)
            lines.append(line)
    rc = proc.returncode
    meta = {"script": f"bench/{name}.py", "rc": rc, "seconds": round(time.monotonic() - t0, 1)}
    got = last_json("".join(lines))
    if got is None:
        shown = log.relative_to(ROOT) if log.is_relative_to(ROOT) else log
        return {**meta, "error": f"no JSON result line (exit code {rc}; output in {shown})"}
    return {**got, **meta}


def run_meta() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else ""),
        "python": platform.python_version(),
    }


def run(names: Sequence[str], results: Path = RESULTS) -> int:
    unknown = [n for n in names if n not in benches()]
    if unknown:
        print(f"no such bench: {', '.join(unknown)} (benches: {', '.join(benches())})", file=sys.stderr)
        return 2
    results.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    with results.open("w") as f:
        f.write(json.dumps({"run": {**run_meta(), "subset": list(names)}}) + "\n")
        for name in names or benches():
            print(f"==> bench/{name}.py", flush=True)
            rec = run_one(name)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            if rec["rc"] != 0 or "error" in rec:
                failed.append(name)
    print(f"results: {results}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- the table


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run metadata, bench records) of a results.jsonl."""
    meta: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        obj = json.loads(line)
        if "run" in obj:
            meta = obj["run"]
        else:
            records.append(obj)
    return meta, records


def fmt(v: object) -> str:
    """A figure for the table: 4 significant digits, ``n/a`` for none (a bench with no baseline)."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def machine_text(records: Sequence[dict[str, Any]]) -> str:
    """The machine the run used, from the benches' ``machine`` objects (every distinct one, if they differ)."""
    hosts = list(dict.fromkeys(
        f"{m['cpu']}, {m['cores']} usable cores of {m['online']}, {m['isa']}"
        for r in records if isinstance(m := r.get("machine"), dict)))
    kernels = list(dict.fromkeys(
        f"{k['cc']}, `{k['flags']}` (native = {k['march_native']}), {k['vector_bits']}-bit vectors, "
        f"{k['threads']} thread(s)"
        for r in records if isinstance(m := r.get("machine"), dict) and isinstance(k := m.get("native"), dict)))
    text = "; ".join(hosts) if hosts else "unknown (no bench reported it)"
    if kernels:
        text += "; native decode kernel: " + "; ".join(kernels)
    return text


def render(meta: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """The Markdown between the markers: a heading line, then one table row per bench."""
    which = (f"a partial `make bench` run (BENCHES=\"{' '.join(meta['subset'])}\")" if meta.get("subset")
             else "one `make bench` run")
    head = (f"Generated by `bench/report.py` from {which}: {meta.get('date', 'date unknown')}, "
            f"commit {meta.get('commit', 'unknown')}, on {machine_text(records)}.")
    rows = ["| bench | ours | baseline | ratio | unit | script |", "|---|---|---|---|---|---|"]
    for r in records:
        script = r.get("script", "")
        if "error" in r:
            rows.append(f"| {Path(script).stem} | failed | | | | `{script}`: {r['error']} |")
            continue
        if "skipped" in r:
            rows.append(f"| {r.get('bench', Path(script).stem)} | skipped | | | | `{script}`: {r['skipped']} |")
            continue
        variant = [str(r[k]) for k in ("mode", "workload", "phase", "stack") if k in r]
        extra = f" ({', '.join(variant)})" if variant else ""
        rows.append(f"| {r.get('bench', Path(script).stem)}{extra} | {fmt(r.get('ours'))} | {fmt(r.get('baseline'))} "
                    f"| {fmt(r.get('ratio'))} | {r.get('unit', '')} | `{script}` |")
    return "\n".join([head, "", *rows])


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``; ValueError without the markers."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} block")
    return text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def write(results: Path = RESULTS, readmes: Sequence[Path] = READMES) -> int:
    if not results.exists():
        print(f"{results} not found: run `make bench` (or bench/report.py run) first", file=sys.stderr)
        return 2
    meta, records = load(results)
    block = render(meta, records)
    for path in readmes:
        path.write_text(replace_block(path.read_text(), block))
        print(f"table written into {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benches, keep their result lines in bench/out/results.jsonl")
    r.add_argument("names", nargs="*", help="benches to run (default: all)")
    w = sub.add_parser("write", help="write the table of a results file into the READMEs")
    w.add_argument("results", nargs="?", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return run(args.names)
    return write(args.results)


if __name__ == "__main__":
    sys.exit(main())
