"""Every benchmark runs (quick mode) and the suite writes its table: ``python -m bench --quick``.

No timing is asserted: these machines are noisy, and the numbers are for
``make bench``.  What must hold is that each benchmark runs to the end, finds
its baseline, and yields rows with a measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys

from support import REPO


def test_every_benchmark_runs_quick_and_the_table_is_written(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)["results"]
    names = [r["name"] for r in results]
    for expected in ("stdio", "passfd", "rpc", "lifecycle", "exec", "memory", "startup", "fastpath"):
        assert expected in names, names
    for res in results:
        for row in res["rows"]:
            assert "FAILED" not in (row["note"] or ""), (res["name"], row)
            skipped = (row["note"] or "").startswith("skipped") or "not installed" in (row["note"] or "")
            assert row["measured"] is not None or skipped or row["note"] == "see results.json", (res["name"], row)
    table = (tmp_path / "results.md").read_text()
    assert "| benchmark | measured | baseline | ratio | target | met? |" in table
    assert table.count("\n| ") >= sum(len(r["rows"]) for r in results)
