"""Fill the ``{Snn.figure}`` placeholders of a document from a fault report.

    SQLA_PQ_FAULT_REPORT=faults.jsonl pytest -m fault            # or tox -e faults
    python -m tests.faults.report faults.jsonl docs/failure-modes.md          # prints the result
    python -m tests.faults.report faults.jsonl docs/failure-modes.md --write  # rewrites the file
    python -m tests.faults.report faults.jsonl                                # a summary table

``{S01.rescue_s}`` takes the figure ``rescue_s`` of the first passing test of scenario S01 that
recorded it (the last report line wins when a scenario ran several times).  A dotted path goes
into nested figures: ``{S19.variants.default.claims_per_s}``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(r"\{(S\d\d)\.([A-Za-z0-9_.]+)\}")


def load(path: str) -> dict[str, list[dict[str, Any]]]:
    by_code: dict[str, list[dict[str, Any]]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            by_code.setdefault(entry["scenario"], []).append(entry)
    return by_code


def lookup(by_code: dict[str, list[dict[str, Any]]], code: str, dotted: str) -> Any:
    for entry in reversed(by_code.get(code, [])):
        value: Any = entry.get("figures", {})
        for part in dotted.split("."):
            if not isinstance(value, dict) or part not in value:
                value = None
                break
            value = value[part]
        if value is not None:
            return value
    return None


def fill(text: str, by_code: dict[str, list[dict[str, Any]]]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = lookup(by_code, match.group(1), match.group(2))
        return match.group(0) if value is None else str(value)

    return PLACEHOLDER.sub(replace, text)


def summary(by_code: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| scenario | test | size | outcome | wall s | figures |", "|---|---|---|---|---|---|"]
    for code in sorted(by_code):
        for e in by_code[code]:
            figures = json.dumps(e.get("figures", {}), sort_keys=True)[:160]
            lines.append(f"| {code} | {e['test'][:60]} | {e['size']} | {e['outcome']} | {e['wall_s']} | {figures} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    by_code = load(argv[0])
    if len(argv) == 1:
        print(summary(by_code))
        return 0
    doc = Path(argv[1])
    filled = fill(doc.read_text(), by_code)
    if "--write" in argv[2:]:
        doc.write_text(filled)
    else:
        sys.stdout.write(filled)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
