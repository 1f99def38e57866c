"""Generated doc sections: the block between a section's two markers is rewritten from a run's
JSON, and the rest of the page stays. Each harness's report module renders its own section."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from xpeft.adapters.errors import XPeftError

REPO = Path(__file__).resolve().parents[2]


def markers(name: str) -> tuple[str, str]:
    """The comment pair around a generated section named ``name`` (docs/DEPLOYMENT.md and others)."""
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def fill(doc: Path, name: str, text: str) -> None:
    """Replace the block between ``name``'s markers in ``doc`` (they must be there)."""
    begin, end = markers(name)
    page = doc.read_text()
    if begin not in page or end not in page:
        raise SystemExit(f"{doc} has no {begin} ... {end} block")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


def machine(hw: dict) -> str:
    return f"a {hw['usable_cpus']}-core x86 CPU ({hw['cpu']}), {hw['memory_gib']} GiB"


def shown_path(results_path: Path) -> str:
    """The results file as the doc names it: relative to the repository when it lies inside."""
    resolved = results_path.resolve()
    return str(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else results_path)


SectionWriter = Callable[[dict, Path, Path], None]


def save(result: dict, out: Path, doc: Path | None, write: SectionWriter, log: Callable[[str], None]) -> None:
    """A run's last step: its JSON to ``out``, then its section of ``doc`` (if any) from that JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    if doc is not None:
        write(result, doc, out)
        log(f"updated {doc}")


def report_main(argv: list[str] | None, description: str | None, results: Path, write: SectionWriter) -> None:
    """``python -m bench.<name>.report [results.json] [--doc docs/DEPLOYMENT.md]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("results", nargs="?", type=Path, default=results)
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "DEPLOYMENT.md")
    args = parser.parse_args(argv)
    write(json.loads(args.results.read_text()), args.doc, args.results)


# The blocks the quality benchmark and the method harnesses generate in docs/METHOD.md and the
# README are named "bench.eval <block>"; "diagnostics" is the default one.
BEGIN, END = markers("bench.eval diagnostics")


def fill_block(doc: str | Path, text: str, name: str = "diagnostics") -> Path:
    """Replace the text between the markers of block ``bench.eval <name>`` in ``doc`` with ``text``."""
    begin, end = markers(f"bench.eval {name}")
    path = Path(doc)
    page = path.read_text(encoding="utf-8")
    if begin not in page or end not in page:
        raise XPeftError("bad_argument", f"{path} has no '{begin}' ... '{end}' block to fill")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")
    return path
