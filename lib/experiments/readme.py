"""Keep the tables quoted in README.md equal to the files the notebooks wrote.

A README block

    <!-- BEGIN figures/01_merging_baselines/text_baselines.md -->
    (anything)
    <!-- END figures/01_merging_baselines/text_baselines.md -->

is replaced by the current content of that file, less its ``<!-- written by ... -->`` header
(the README is not written by a notebook). ``make readme`` rewrites README.md in place;
``python -m lib.experiments.readme --check`` changes nothing and exits 1 if it is out of date,
and a test runs the same check, so a re-run notebook cannot leave the README quoting old numbers.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..paths import REPO_ROOT

_BEGIN = re.compile(r"<!-- BEGIN (\S+) -->")
_BLOCK = re.compile(r"(<!-- BEGIN (figures/\S+\.md) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def _content(path: Path) -> str:
    """The file's text without the header comment that :class:`~lib.experiments.report.Run` writes."""
    text = path.read_text()
    first, newline, rest = text.partition("\n")
    if first.startswith("<!-- written by") and first.rstrip().endswith("-->"):
        text = rest
    return text if text.endswith("\n") else text + "\n"  # keep the END marker on its own line


def sync(text: str, root: Path) -> str:
    """``text`` (a README) with every ``BEGIN``/``END`` block refilled from ``root / <path>``."""
    root = Path(root)
    blocks = _BLOCK.findall(text)
    # A marker the pattern does not pair up would otherwise be skipped without a word.
    if len(blocks) != len(_BEGIN.findall(text)):
        paired = {path for _, path, _, _ in blocks}
        bad = [p for p in _BEGIN.findall(text) if p not in paired]
        raise ValueError(f"README block(s) {bad} have no matching '<!-- END <same path> -->' line, "
                         "or name a file outside figures/ that is not a .md file.")

    def refill(match: re.Match) -> str:
        begin, name, _, end = match.groups()
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"README quotes {name}, which does not exist: run the notebook that writes "
                                    "it, or remove the block.")
        return begin + _content(path) + end

    return _BLOCK.sub(refill, text)


RUN_TIMES = "figures/run_times.md"


def run_times(root: Path) -> str:
    """A table of every committed run's record (``figures/*/run.json``): what ran, at which commit,
    for how long, with what peak memory (host, and GPU where one was used), on which device and how
    many CPU threads. The README quotes it, so no run time is typed by hand."""
    import json

    rows = ["| output | written by | commit | wall time | peak memory | device | threads | finished (UTC) |",
            "|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(root).glob("figures/*/run.json")):
        record = json.loads(path.read_text())
        minutes = record.get("wall_time_seconds", float("nan")) / 60
        machine = record.get("machine", {})
        device = machine.get("device", "?")
        if device == "cpu" and machine.get("cpu"):  # records from before the CPU's name was kept say "cpu"
            device = f"cpu ({machine['cpu']})"
        rows.append(f"| `{path.parent.relative_to(root)}/` | `{record.get('notebook', '?')}` | "
                    f"{str(record.get('git_commit', '?'))[:7]}{'+' if '+' in str(record.get('git_commit')) else ''} | "
                    f"{minutes:.1f} min | {_peak(record.get('peak_memory'))} | {device} | {machine.get('threads', '?')} | "
                    f"{record.get('finished_utc', '?')} |")
    return "\n".join(rows) + "\n"


def _peak(memory: dict | None) -> str:
    """A run's peak memory as the table shows it (records from before it was kept: "?")."""
    if not memory:
        return "?"
    text = f"{memory['host_rss_gib']:.1f} GiB"
    return text + (f", GPU {memory['gpu_allocated_gib']:.1f} GiB" if "gpu_allocated_gib" in memory else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.experiments.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md is out of date")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    readme = args.root / "README.md"
    times, times_path = run_times(args.root), args.root / RUN_TIMES
    if not times_path.exists() or times_path.read_text() != times:
        if args.check:
            print(f"{RUN_TIMES} is out of date: run `make readme`.", file=sys.stderr)
            return 1
        times_path.write_text(times)
    old = readme.read_text()
    new = sync(old, args.root)
    if new == old:
        print(f"{readme.name} is in sync with figures/.")
        return 0
    if args.check:
        print(f"{readme.name} quotes outdated tables: run `make readme`.", file=sys.stderr)
        return 1
    readme.write_text(new)
    print(f"{readme.name}: blocks refilled from figures/.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
