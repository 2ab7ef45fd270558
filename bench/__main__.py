"""Run every benchmark; write bench/results.json and bench/results.md; print the table.

    python -m bench [--quick] [--only stdio,rpc] [--out DIR]      (make bench)

Each benchmark runs in its own process (``python -m bench.NAME --json``) so
that one cannot disturb the next, and one that fails becomes a row saying so
rather than ending the run.  ``bench_*.py`` modules written for one component
(the fast-path twins, the policy engine, ...) are run through their ``run()``
and summarised; their full results go into results.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from bench.common import PYTHON, REPO, Row, absolute_row, fmt, print_rows, to_json

HERE = os.path.dirname(os.path.abspath(__file__))
#: the suite, in order (issue 9's list); the component benchmarks come after
SUITE = ["stdio", "passfd", "rpc", "lifecycle", "exec", "memory", "startup", "fastpath"]
#: component benchmarks that fastpath already summarises
COVERED = {"bench_framing", "bench_uevent", "bench_cgroupwrite"}
TIMEOUT = 1800


def discover() -> list[str]:
    names = [n for n in SUITE if os.path.exists(os.path.join(HERE, f"{n}.py"))]
    extra = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    return names + [n for n in extra if n not in COVERED]


def _summarise_foreign(name: str, raw: dict) -> list[Row]:
    """Rows for a component benchmark's own result shape (unknown shapes get one row)."""
    try:
        if name == "bench_policy":
            rows = [absolute_row("policy decision, CreateContainer", raw["create_container"]["total_us"], "µs",
                                 target=f"≤ {raw['target_us']:.0f} µs", at_most=raw["target_us"],
                                 note=f"no policy: {raw['no_policy_us']:.1f} µs")]
            rows.append(absolute_row("policy decision, ReadStdout", raw["read_stream"]["total_us"], "µs",
                                     target=f"≤ {raw['target_us']:.0f} µs", at_most=raw["target_us"]))
            return rows
    except (KeyError, TypeError):
        pass
    return [Row(name, None, "", note="see results.json")]


def run_one(name: str, quick: bool) -> dict:
    """Run one benchmark in a child process; never raises."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [PYTHON, "-m", "bench", "--child", name, "--json", path] + (["--quick"] if quick else [])
    started = time.perf_counter()
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])
        with open(path) as f:
            result = json.load(f)
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        reason = exc.args[0][0] if isinstance(exc, RuntimeError) and exc.args and exc.args[0] else str(exc)
        result = {"name": name, "rows": [Row(name, None, "", note=f"FAILED: {reason}").as_dict()],
                  "details": {}}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    result["seconds"] = time.perf_counter() - started
    result["load_average_before"] = load
    return result


def child(name: str, quick: bool, path: str) -> None:
    mod = importlib.import_module(f"bench.{name}")
    result = mod.run(quick)
    if "rows" not in result:  # a component benchmark with its own result shape
        result = {"name": name, "rows": _summarise_foreign(name, result), "details": result}
    with open(path, "w") as f:
        json.dump(to_json(result), f, indent=2, default=str)


def markdown(results: list[dict], header: dict) -> str:
    lines = [f"# kagent benchmarks ({header['date']})", "",
             f"{header['machine']}; fast path: {header['fast_path']}; mode: {header['mode']}.",
             "Baselines are measured in the same run; ratios are measured / baseline.", "",
             "| benchmark | measured | baseline | ratio | target | met? | notes |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            base = f"{fmt(r['baseline'], r['unit'])} ({r['baseline_name']})" if r["baseline"] is not None else "—"
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "—"
            met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
            note = (r.get("note") or "").replace("|", "/")
            lines.append(f"| {res['name']}: {r['benchmark']} | {fmt(r['measured'], r['unit'])} | {base} | {ratio} "
                         f"| {r['target'] or '—'} | {met} | {note} |")
    lines.append("")
    lines.append("Load average before each benchmark (2 vCPUs; above ~1 the machine was busy with other work): "
                 + ", ".join(f"{r['name']} {r['load_average_before']:.1f}" for r in results) + ".")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="kagent benchmarks")
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (the smoke test)")
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--out", default=HERE, help="where results.json and results.md go (default: bench/)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.json)
        return 0
    names = discover()
    if args.only:
        wanted = args.only.split(",")
        names = [n for n in names if n in wanted]
    from kagent import _fast, stdio

    header = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
              "fast_path": _fast.status(), "mode": "quick" if args.quick else "full",
              "stdio_default": stdio.MODE}
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        res = run_one(name, args.quick)
        results.append(res)
        print_rows([Row(**r) for r in res["rows"]])
        print(f"   ({res['seconds']:.1f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "results": results}, f, indent=2, default=str)
    table = markdown(results, header)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
