"""Follow each lost or duplicated job of a chaos row through its worker logs.

    python benchmarks/_chaos_explain.py benchmarks/results/run-<time>.json "<row name>"

For every key lost or duplicated in a seed, the job's life in that seed's log, in order: each
start, end and checkpoint of the job (with the worker's generation and the queue's message
id, from the lines _chaos_job writes), and what graceful's Celery host said about that message
at a deadline ("put back", "NOT put back"). A duplicate whose first run ended before a "put
back" of the same message is a finished task put back (issue #29); a lost early-acked task
shows "NOT put back"; a duplicate with no "put back" line went back some other way (kombu's
restore of every unacknowledged message, Celery's own restore at its warm shutdown).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

JOB = re.compile(r"chaos job (?P<id>\S+) c=(?P<c>\d+) (?P<what>.*?): gen (?P<gen>\S+) pid \d+ ?(?P<ref>\S*)")
CELERY = re.compile(
    r"celery task \S+\[(?P<ref>[0-9a-f-]+)\] (?P<what>put back on its queue at the deadline|"
    r"was acknowledged when it started: it is lost)"
)
GENERATION = re.compile(r"===== generation (\S+) =====")


def _label(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


def history(log: Path) -> dict[str, list[str]]:
    """job id -> what happened to it, in the order of the log."""
    events: dict[str, list[str]] = defaultdict(list)
    job_of: dict[str, str] = {}
    gen = "?"
    for line in log.read_text(errors="replace").splitlines():
        if match := GENERATION.match(line):
            gen = match.group(1)
        elif match := JOB.match(line):
            job_of[match["ref"]] = match["id"]
            events[match["id"]].append(
                f"gen {match['gen']}: {match['what']} from item {match['c']} [{match['ref'][:8]}]"
            )
        elif match := CELERY.search(line):
            what = "PUT BACK" if match["what"].startswith("put back") else "NOT put back (acknowledged)"
            job = job_of.get(match["ref"], f"message {match['ref'][:8]}")
            events[job].append(f"gen {gen}: graceful: {what} [{match['ref'][:8]}]")
    return events


def _of_seed(keys: dict[str, list[str]] | list[str], seed: int) -> list[str]:
    """The keys of one seed (runs before per-seed lists: every seed's, merged)."""
    return keys if isinstance(keys, list) else keys.get(str(seed), [])


def main(run: str, row: str) -> int:
    rows = [r for r in json.loads(Path(run).read_text())["rows"] if r["contender"] == row]
    if not rows or "logs" not in rows[0]["data"]:
        sys.exit(f"no chaos row {row!r} with logs in {run}")
    data = rows[0]["data"]
    for seed in data["seeds"]:
        events = history(Path(data["logs"]) / f"{_label(row)}-seed{seed}.log")
        keys = [("duplicated", k.split()[0]) for k in _of_seed(data["duplicated_keys"], seed)]
        keys += [("lost", k) for k in _of_seed(data["lost_keys"], seed)]
        print(f"seed {seed}: {len(keys)} key(s)")
        for kind, key in keys:
            print(f"  {kind} {key}: " + "; ".join(events.get(key.split(":")[0], ["(no line in the log)"])))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
