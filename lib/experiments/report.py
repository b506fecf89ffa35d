"""Write a notebook's results into ``figures/<notebook>/`` with what produced them.

    run = Run("01_merging_baselines", parameters)      # starts the clock
    run.table(df, "text_baselines")                      # CSV + Markdown
    run.figure(fig, "text_baselines")                    # PNG
    run.finish()                                         # run.json: parameters, seed, commit, wall time, peak memory

Every output of a run shares one ``run.json``, so a figure can always be traced to the
parameters, git commit and machine that made it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..paths import REPO_ROOT


def git_commit() -> str:
    if os.environ.get("RUN_GIT_COMMIT"):  # set by whoever sent a copy of the tree to another machine
        return os.environ["RUN_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lib", "notebooks", "benchmarks"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def relative_paths(value):
    """``value`` with every absolute path in it rewritten relative to the repository, so that
    committed outputs carry no machine paths (a mirror beside the checkout becomes ``../shared/data``)."""
    if isinstance(value, dict):
        return {k: relative_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v) for v in value]
    if isinstance(value, (str, Path)) and os.path.isabs(str(value)):
        return os.path.relpath(str(value), REPO_ROOT)
    return value


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), or the platform's processor string: timings
    differ between machines, and a run record says which one made them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far (a notebook's kernel, a benchmark's script): resident host
    memory and, where the process used CUDA, the most memory its tensors held on the GPU at once
    (``torch.cuda.max_memory_allocated``), in GiB."""
    import resource
    import sys

    import torch

    try:  # Linux: the high-water mark of this process's own memory since it started (exec)
        status = Path("/proc/self/status").read_text()
        kib = float(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        # ru_maxrss is no substitute on Linux, where it keeps the forking parent's size across exec
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    peak = {"host_rss_gib": round(kib / 2**20, 2)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return peak


class Run:
    def __init__(self, notebook: str, parameters: dict, out_dir: str | Path | None = None, source: str | None = None,
                 started: float | None = None):
        """``source``: the file that writes the outputs (default ``notebooks/<notebook>.ipynb``;
        a benchmark passes its script). ``started``: the ``time.perf_counter()`` reading when the
        work began, for a script that measures first and only then decides to record (default:
        now); the wall time in run.json counts from it."""
        self.notebook = notebook
        self.source = source or f"notebooks/{notebook}.ipynb"
        self.parameters = parameters
        self.dir = Path(out_dir or REPO_ROOT / "figures" / notebook)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter() if started is None else started
        self.outputs: list[str] = []
        self.timings: dict[str, float] = {}

    def header(self) -> str:
        return (f"<!-- written by {self.source}; parameters, seed, commit and wall time "
                f"in run.json -->\n")

    def table(self, df: pd.DataFrame, name: str, caption: str = "") -> Path:
        df.to_csv(self.dir / f"{name}.csv")
        md = self.header() + (f"{caption}\n\n" if caption else "") + df.to_markdown(floatfmt=".1f") + "\n"
        (self.dir / f"{name}.md").write_text(md)
        self.outputs += [f"{name}.csv", f"{name}.md"]
        return self.dir / f"{name}.md"

    def figure(self, fig, name: str) -> Path:
        path = self.dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
        self.outputs.append(path.name)
        return path

    def text(self, content: str, name: str) -> Path:
        path = self.dir / name
        path.write_text(content)
        self.outputs.append(name)
        return path

    def lap(self, label: str) -> None:
        """Record the wall time since the start under ``label``."""
        self.timings[label] = round(time.perf_counter() - self.started, 1)

    def finish(self) -> dict:
        import torch

        record = {
            "notebook": self.source,
            "parameters": relative_paths(self.parameters),
            "seed": self.parameters.get("seed"),
            "git_commit": git_commit(),
            "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_seconds": round(time.perf_counter() - self.started, 1),
            "timings_seconds": self.timings,
            "peak_memory": peak_memory(),
            "machine": {"platform": platform.platform(), "cpu": cpu_name(), "cores": os.cpu_count(),
                        "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
            "outputs": sorted(set(self.outputs)),
            "output_dir": relative_paths(str(self.dir.resolve())),
        }
        (self.dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        return record
