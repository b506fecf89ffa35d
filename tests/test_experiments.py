"""The shared experiment plumbing: typed notebook config, validation-only selection, findings
with uncertainties, code-keyed caches, run records without machine paths, README sync."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from lib.experiments.cache import cached_tensors
from lib.experiments.config import notebook_config
from lib.experiments.findings import Estimate, held, mean_accuracy, over_seeds, paired_difference, verdict
from lib.experiments.readme import sync
from lib.experiments.report import Run
from lib.experiments import selection
from lib.experiments.selection import select
from lib.paths import REPO_ROOT


# ----------------------------------------------------------------------------- config
@dataclass
class _Config:
    tasks: tuple[str, ...] = ("x",)
    grid: tuple[float, ...] = (0.5,)
    pairs: list = field(default_factory=lambda: [["a", "b"]])  # bare `list`, as FSStudyConfig has
    only_if: tuple[str, ...] | None = None
    scale: str = "small"
    seed: int = 0


def test_notebook_config_parses_command_line_lists_into_the_fields_types():
    config = notebook_config(_Config, {"tasks": '["a", "b"]', "grid": "[0.1, 0.2]", "pairs": '[["c", "d"]]',
                                       "only_if": '["e"]', "seed": 3, "unrelated": 1})
    assert config.tasks == ("a", "b") and isinstance(config.tasks, tuple)
    assert config.grid == (0.1, 0.2)
    assert config.pairs == [["c", "d"]]
    assert config.only_if == ("e",)
    assert config.seed == 3
    assert notebook_config(_Config, {"tasks": ["a"]}).tasks == ("a",)  # a YAML list, too
    assert notebook_config(_Config, {"tasks": "('a', 'b')"}).tasks == ("a", "b")  # a Python literal


def test_notebook_config_keeps_defaults_and_rejects_bad_values():
    assert notebook_config(_Config, {}) == _Config()
    assert notebook_config(_Config, {"only_if": None}).only_if is None
    with pytest.raises(ValueError, match="choose one of .*small"):
        notebook_config(_Config, {"scale": "huge"})
    with pytest.raises(ValueError, match="'tasks'.*not a list"):
        notebook_config(_Config, {"tasks": "sst2"})


# ----------------------------------------------------------------------------- selection
class _Track:
    """A track whose test split cannot be read: selection must never get that far."""

    tasks = ["a"]

    def split(self, task, which):
        if which != "validation":
            raise AssertionError(f"the fake track's {which} split was read")
        return np.array([1.0, 2.0])

    def raw(self, task):
        raise AssertionError("raw data was read")


def test_selection_never_reads_test():
    def peeks_at_test(value, data):
        return float(data.split("a", "test").mean())

    with pytest.raises(selection.TestSplitAccessed, match="'test' split"):
        select("scale", (0.0, 1.0), peeks_at_test, _Track())
    with pytest.raises(selection.TestSplitAccessed):
        select("scale", (0.0, 1.0), lambda v, data: data.raw("a"), _Track())
    # validation and the track's other attributes are served
    chosen = select("scale", (0.0, 1.0), lambda v, data: -v * data.split(data.tasks[0], "validation").sum(), _Track(),
                    bounds=(0, None))
    assert chosen.best == 0.0


def test_optimum_on_the_edge_extends_the_grid_within_bounds():
    peak_at = lambda top: (lambda v, data: -(v - top) ** 2)  # noqa: E731
    inside = select("lambda", (0.1, 0.2, 0.3), peak_at(0.42), _Track(), bounds=(0, 1))
    assert inside.extended == [0.4, 0.5] and inside.best == 0.4 and inside.on_edge is None
    assert "extended by 0.4, 0.5" in inside.note and "edge of the searched grid" not in inside.note

    beyond = select("lambda", (0.1, 0.2, 0.3), peak_at(5.0), _Track(), max_extensions=2)
    assert beyond.extended == [0.4, 0.5] and beyond.best == 0.5 and beyond.on_edge == "upper"
    assert "optimum may lie beyond" in beyond.note

    bounded = select("lambda", (0.05, 0.15, 0.25), peak_at(-1.0), _Track(), bounds=(0, None))
    assert bounded.extended == [0.0] and bounded.best == 0.0  # a step past the bound stops at it
    assert bounded.on_edge == "lower" and bounded.at_bound and "bound of lambda" in bounded.note
    assert "beyond" not in bounded.note

    names = select("method", ("b", "a"), lambda v, data: 1.0 if v == "a" else 0.0, _Track())
    assert names.best == "a" and names.extended == [] and names.note == ""  # non-numeric: never extended


def test_coarse_to_fine_refinement_reaches_the_fine_grid_optimum_with_fewer_evaluations():
    calls = []

    def peak_at_035(v, data):
        calls.append(v)
        return -(v - 0.35) ** 2 + (0.001 if v == 0.35 else 0.0)

    fine = [round(0.05 * i, 2) for i in range(21)]
    coarse = fine[::2]
    refined = select("lambda", coarse, peak_at_035, _Track(), bounds=(0, None), refinements=1)
    assert refined.best == select("lambda", fine, peak_at_035, _Track()).best == 0.35
    calls.clear()
    select("lambda", coarse, peak_at_035, _Track(), bounds=(0, None), refinements=1)
    assert len(calls) == 13 and refined.extended == [] and refined.note == ""
    # without refinement the coarse grid cannot reach 0.35
    assert select("lambda", coarse, peak_at_035, _Track()).best in (0.3, 0.4)
    # at a bound the refinement stays inside it, and the edge is still reported
    at_zero = select("lambda", coarse, lambda v, data: -v, _Track(), bounds=(0, None), refinements=2)
    assert at_zero.best == 0.0 and at_zero.at_bound and min(v for v, _ in at_zero.scores) == 0.0
    assert sorted(v for v, _ in at_zero.scores)[:3] == [0.0, 0.025, 0.05]


def test_ties_pick_the_smallest_value():
    flat_top = select("lambda", (0.4, 0.1, 0.2, 0.3), lambda v, data: float(0.2 <= v <= 0.3), _Track())
    assert flat_top.best == 0.2 and flat_top.extended == []
    flat = select("lambda", (0.1, 0.2, 0.3), lambda v, data: 1.0, _Track(), bounds=(0.1, None))
    assert flat.best == 0.1 and flat.extended == []


# ----------------------------------------------------------------------------- findings
def test_mean_accuracy_and_its_standard_error_by_hand():
    estimate = mean_accuracy({"a": [1, 1, 0, 0], "b": [True, True, True, False]})
    # task means 0.5 and 0.75; sample variances 1/3 and 1/4, over 4 examples each; 2 tasks
    assert estimate.value == pytest.approx(62.5)
    assert estimate.se == pytest.approx(100 * math.sqrt(1 / 12 + 1 / 16) / 2)


def test_paired_difference_by_hand():
    a = {"t": [1, 1, 1, 0, 0, 0], "u": [1, 1]}
    b = {"t": [1, 1, 0, 0, 0, 0], "u": [0, 1]}
    d = paired_difference(a, b)
    # t: differences (0,0,1,0,0,0), mean 1/6, sample variance 1/6, /6 -> 1/36
    # u: differences (1,0), mean 1/2, sample variance 1/2, /2 -> 1/4
    assert d.value == pytest.approx(100 * (1 / 6 + 1 / 2) / 2)
    assert d.se == pytest.approx(100 * math.sqrt(1 / 36 + 1 / 4) / 2)
    # pairing: the same outcomes shifted together have no uncertainty
    assert paired_difference({"t": [1, 0, 1, 0]}, {"t": [1, 0, 1, 0]}) == Estimate(0.0, 0.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_difference({"t": [1, 0]}, {"t": [1, 0, 1]})
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference({"t": [1]}, {"u": [1]})


def test_over_seeds_by_hand():
    assert over_seeds([1.0, 2.0, 3.0]) == Estimate(2.0, pytest.approx(1 / math.sqrt(3)))
    assert math.isnan(over_seeds([4.0]).se)


def test_verdict_thresholds_and_held():
    assert verdict(Estimate(4.01, 2.0)) == "better"  # more than 2 standard errors
    assert verdict(Estimate(4.0, 2.0)) == "within noise"  # exactly 2 is not more
    assert verdict(Estimate(-4.01, 2.0)) == "worse"
    assert verdict(Estimate(-3.0, 2.0)) == "within noise"
    assert verdict(Estimate(1.0, 0.4), z=3) == "within noise"
    assert verdict(Estimate(1.0, float("nan"))).startswith("undetermined")
    assert held(Estimate(4.01, 2.0)) == "held"
    assert held(Estimate(-4.01, 2.0)) == "did not hold"
    assert held(Estimate(1.0, 2.0)) == "inconclusive (within noise)"
    assert held(Estimate(1.0, float("nan"))).startswith("undetermined")


# ----------------------------------------------------------------------------- cache
def _produce(folder: Path, name: str, body: str):
    """A function ``produce`` defined in its own source file (an edit = another file's source)."""
    path = folder / f"{name}.py"
    path.write_text(f"def produce():\n    return {body}\n")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.produce


def test_cache_invalidation(tmp_path):
    calls = []

    def cached(spec, code=()):
        compute = lambda: calls.append(1) or {"x": torch.tensor([float(len(calls))])}  # noqa: E731
        return cached_tensors("k", spec, compute, root=tmp_path / "cache", code=code)["x"].item()

    base = {"config": {"lr": 1e-3, "steps": 10}, "task": "a"}
    assert cached(base) == 1
    assert cached(dict(base)) == 1 and len(calls) == 1  # the same spec hits
    assert cached({**base, "config": {"lr": 1e-4, "steps": 10}}) == 2  # a changed setting does not
    assert cached(base) == 1  # and the old entry is still there

    before = _produce(tmp_path, "before", "1")
    after = _produce(tmp_path, "after", "2")  # the same function, edited
    assert cached(base, code=[before]) == 3
    assert cached(base, code=[before]) == 3
    assert cached(base, code=[after]) == 4  # the edit recomputes instead of serving a stale result
    assert len(calls) == 4


def test_estimates_show_a_difference_that_rounds_to_zero_as_plus_zero():
    # float rounding differs between CPUs: -1e-7 and +1e-7 must read the same
    assert str(Estimate(-1e-7, 0.01)) == str(Estimate(1e-7, 0.01)) == "+0.0 ± 0.0"
    assert Estimate(-0.04, 0.2).plain() == "0.0 ± 0.2" and str(Estimate(-0.06, 0.2)) == "-0.1 ± 0.2"


# ----------------------------------------------------------------------------- report
def test_run_record_holds_no_absolute_paths(tmp_path):
    parameters = {"data_dir": "/somewhere/shared/data", "nested": {"models": Path("/opt/models")},
                  "tasks": ("a", "/abs/task.csv"), "relative": "../shared/data", "seed": 3}
    run = Run("00_test", parameters, out_dir=tmp_path / "figures" / "00_test")
    run.finish()
    record = json.loads((tmp_path / "figures" / "00_test" / "run.json").read_text())

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    absolute = [s for s in strings({k: v for k, v in record.items() if k != "machine"}) if os.path.isabs(s)]
    assert absolute == []
    p = record["parameters"]
    assert os.path.normpath(REPO_ROOT / p["data_dir"]) == "/somewhere/shared/data"  # rewritten, not dropped
    assert os.path.normpath(REPO_ROOT / p["nested"]["models"]) == "/opt/models"
    assert p["tasks"][0] == "a" and p["relative"] == "../shared/data" and record["seed"] == 3



def test_run_wall_time_counts_from_the_start_it_is_given(tmp_path):
    """A benchmark measures first and records after: its wall time must count from its start."""
    record = Run("00_test", {}, out_dir=tmp_path, started=time.perf_counter() - 5.0).finish()
    assert record["wall_time_seconds"] >= 5.0
    assert Run("00_test", {}, out_dir=tmp_path).finish()["wall_time_seconds"] < 5.0


def test_committed_run_records_have_a_wall_time_and_a_clean_commit():
    """Every committed run.json says how long its run took and which commit made it, with no
    uncommitted changes in lib/, notebooks/ or benchmarks/ (run_times.md shows both)."""
    records = sorted((REPO_ROOT / "figures").glob("*/run.json"))
    assert records
    for path in records:
        record = json.loads(path.read_text())
        name = path.relative_to(REPO_ROOT)
        assert record["wall_time_seconds"] > 0, f"{name}: wall time 0; re-run it (its Run must be given started=)"
        assert "+" not in record["git_commit"], f"{name} was written from a dirty tree: re-run it on a clean one"

# ----------------------------------------------------------------------------- README
HEADER = "<!-- written by notebooks/00.ipynb; parameters, seed, commit and wall time in run.json -->\n"


def test_run_times_table_names_each_runs_commit_time_and_machine(tmp_path):
    from lib.experiments.readme import run_times
    for name, machine, commit, peak in [
            ("a", {"device": "cpu", "cpu": "Some Xeon", "threads": 2}, "abcdef0123", {"host_rss_gib": 3.21}),
            ("b", {"device": "NVIDIA H200", "cpu": "Some EPYC", "threads": 16}, "1234567+x",
             {"host_rss_gib": 9.0, "gpu_allocated_gib": 12.54}),
            ("c", {"device": "cpu", "threads": 1}, "fedcba9876", None)]:
        (tmp_path / "figures" / name).mkdir(parents=True)
        (tmp_path / "figures" / name / "run.json").write_text(json.dumps(
            {"notebook": f"benchmarks/{name}.py", "git_commit": commit, "wall_time_seconds": 90, "machine": machine,
             **({"peak_memory": peak} if peak else {})}))
    rows = run_times(tmp_path).splitlines()[2:]
    assert rows[0].startswith("| `figures/a/` | `benchmarks/a.py` | abcdef0 | 1.5 min | 3.2 GiB | cpu (Some Xeon) | 2 |")
    # an accelerator is named, not the host's CPU, and its peak beside the host's
    assert "| 1234567+ | 1.5 min | 9.0 GiB, GPU 12.5 GiB | NVIDIA H200 | 16 |" in rows[1]
    assert "| 1.5 min | ? | cpu | 1 |" in rows[2]  # an old record: no peak memory, no CPU name


def test_a_run_record_holds_the_processs_peak_host_memory(tmp_path):
    """run.json's peak_memory is the process's resident peak, in GiB: a fresh process that held
    a 1 GiB buffer reports over 1 GiB, one that did not reports less."""
    def peak(buffer_gib: float) -> dict:
        code = ("import sys, json, numpy as np; from lib.experiments.report import Run; "
                f"b = np.ones(int({buffer_gib} * 2**30 / 8)); del b; "
                f"print(json.dumps(Run('00_test', {{}}, out_dir=sys.argv[1]).finish()['peak_memory']))")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True,
                             cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert peak(0)["host_rss_gib"] < 1.0
    assert peak(1)["host_rss_gib"] > 1.0
    assert "gpu_allocated_gib" not in peak(0)  # no CUDA used, no GPU peak


def test_readme_sync_rewrites_stale_blocks(tmp_path):
    (tmp_path / "figures" / "nb").mkdir(parents=True)
    (tmp_path / "figures" / "nb" / "table.md").write_text(HEADER + "| a |\n|---|\n| 2 |\n")
    (tmp_path / "figures" / "nb" / "note.md").write_text("no header here")
    readme = ("# Title\n\n<!-- BEGIN figures/nb/table.md -->\n| a |\n|---|\n| 1 |\n<!-- END figures/nb/table.md -->\n"
              "\ntext\n<!-- BEGIN figures/nb/note.md -->\n<!-- END figures/nb/note.md -->\n")
    (tmp_path / "README.md").write_text(readme)
    expected = ("# Title\n\n<!-- BEGIN figures/nb/table.md -->\n| a |\n|---|\n| 2 |\n<!-- END figures/nb/table.md -->\n"
                "\ntext\n<!-- BEGIN figures/nb/note.md -->\nno header here\n<!-- END figures/nb/note.md -->\n")
    assert sync(readme, tmp_path) == expected
    assert sync(expected, tmp_path) == expected

    def run(*args):
        return subprocess.run([sys.executable, "-m", "lib.experiments.readme", "--root", str(tmp_path), *args],
                              cwd=REPO_ROOT, capture_output=True, text=True).returncode

    assert run("--check") == 1 and (tmp_path / "README.md").read_text() == readme  # --check changes nothing
    assert run() == 0 and (tmp_path / "README.md").read_text() == expected
    assert run("--check") == 0

    with pytest.raises(ValueError, match="no matching"):
        sync("<!-- BEGIN figures/nb/table.md -->\nold\n", tmp_path)
    with pytest.raises(FileNotFoundError, match="figures/nb/gone.md"):
        sync("<!-- BEGIN figures/nb/gone.md -->\n<!-- END figures/nb/gone.md -->\n", tmp_path)


def test_readme_in_sync():
    text = (REPO_ROOT / "README.md").read_text()
    assert sync(text, REPO_ROOT) == text, "README.md quotes outdated tables from figures/: run `make readme`."


def test_a_custom_run_writes_to_its_own_folder_and_only_the_default_run_to_figures():
    from lib.experiments.baselines import BaselinesConfig
    from lib.experiments.config import output_folder
    from lib.paths import REPO_ROOT

    default = BaselinesConfig(data_dir="../shared/data", models_dir="../shared/models")  # locations don't count
    assert output_folder("01_merging_baselines", default) == REPO_ROOT / "figures" / "01_merging_baselines"
    custom = BaselinesConfig(text_tasks=("sst2", "../my_data/my.task.csv"), seed=3)
    path = output_folder("01_merging_baselines", custom)
    assert path.parent == REPO_ROOT / "runs" / "01_merging_baselines"
    assert path.name.startswith("text_tasks=sst2+my.task.csv_seed=3-")
    other = output_folder("01_merging_baselines", BaselinesConfig(text_tasks=("sst2", "../elsewhere/my.task.csv"), seed=3))
    assert other != path  # same short description, different parameters: the hash keeps them apart
    assert output_folder("01_merging_baselines", BaselinesConfig(output_dir="figures/01_merging_baselines", seed=3)) \
        == REPO_ROOT / "figures" / "01_merging_baselines"  # asked for explicitly


def test_models_dir_defaults_like_the_makefile_and_offline_errors_name_the_file(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from lib.experiments import tracks

    monkeypatch.delenv("MODELS_DIR", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "mirror" / "data"))
    assert tracks.models_mirror().resolve() == (tmp_path / "mirror" / "models").resolve()  # $(DATA_DIR)/../models
    with pytest.raises(FileNotFoundError, match=r"resnet56-4bfd9763\.th not found\. Put resnet56-4bfd9763\.th .* in"):
        tracks.cifar_resnet_checkpoint("resnet56")
    with pytest.raises(ValueError, match="choose one of resnet20, resnet56"):
        tracks.cifar_resnet_checkpoint("resnet18")

    monkeypatch.delenv("DATA_DIR")  # no mirror at all: download, which fails offline
    monkeypatch.setenv("MERGE_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    assert tracks.models_mirror() is None

    def offline(url, filename):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(RuntimeError, match=r"Could not download resnet20-12fca82f\.th .* set models_dir \(or MODELS_DIR\)"):
        tracks.cifar_resnet_checkpoint("resnet20")
