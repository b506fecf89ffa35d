"""Notebook 01 at paper scale on full-size random stand-ins, offline: what it costs in time and
memory before anyone downloads the real models and datasets (issue 12).

    make rehearse-paper                                  # ViT-B/32, 8 tasks; on a GPU when there is one
    make rehearse-paper ARCH=ViT-L-14
    python benchmarks/rehearse_paper.py --tiny --tasks mnist eurosat --no-record   # a check of the script

It writes (``lib.paper.rehearsal``) θ0, an open_clip CLIP of ``--arch``'s real shape with random
weights, in open_clip's hub layout; one expert per task in FusionBench's published format
(transformers' ``CLIPVisionModel`` folders); and each task as a hub copy with its real class names,
``--train-per-class`` and ``--test-per-class`` JPEG images at the real dataset's typical size.
Then it runs ``notebooks/01_merging_baselines.ipynb`` under papermill as a user would
(``scale="paper"``, ``paper_vision_source="huggingface"``, the notebook's other paper-scale
defaults unless ``--param`` sets them) and reports the notebook's own record: each stage's wall
time, each merge's time, and the kernel's peak host and GPU memory.

What carries over to the real run: the model sizes (so the merges' times, the GPU memory of every
step, and the per-image costs) are the real ones. What does not: the datasets are smaller (the
real test sets hold about 87,000 images; scale the evaluation stage by the image counts) and the
weights are random, so accuracies, and the λ each selection lands on, mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from lib.experiments.report import Run  # noqa: E402
from lib.paper import rehearsal as R  # noqa: E402
from lib.paper.clip import CLIP_ARCHS  # noqa: E402
from lib.paper.vision_data import PAPER_VISION_TASKS  # noqa: E402
from lib.paths import REPO_ROOT  # noqa: E402

NOTEBOOK = REPO_ROOT / "notebooks" / "01_merging_baselines.ipynb"
RECORD_DIR = REPO_ROOT / "figures" / "bench_paper_rehearsal"
# what notebook 01 did before each lap of run_track (the first stage includes the kernel's start)
STAGES = {"experts ready": "θ0, zero-shot heads and experts loaded", "statistics ready": "Fisher and RegMean statistics",
          "merges ready": "merges, each with its λ chosen on validation", "evaluated": "every model on the test sets"}


def write_stand_ins(files: Path, arch: str, tasks: list[str], train_per_class: int, test_per_class: int,
                    tiny: bool) -> dict:
    """θ0, the experts and the hub copies under ``files``/models and ``files``/data, once per
    setting (``stand_ins.json`` names what a folder holds; another setting writes afresh)."""
    setting = {"arch": arch, "tasks": tasks, "train_per_class": train_per_class,
               "test_per_class": test_per_class, "tiny": tiny}
    marker = files / "stand_ins.json"
    if marker.is_file() and json.loads(marker.read_text())["setting"] == setting:
        return json.loads(marker.read_text())
    if files.exists():
        shutil.rmtree(files)
    started = time.perf_counter()
    R.write_clip_hub(files / "models", tasks, arch, config=R.TINY_CLIP if tiny else None)
    sizes = R.write_hub_copies(files / "data", tasks, train_per_class, test_per_class)
    written = {"setting": setting, "split_sizes": sizes, "seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(written, indent=2) + "\n")
    return written


def parameter(text: str) -> tuple[str, object]:
    """``name=value`` for papermill, the value read as JSON where it parses (numbers, lists)."""
    name, _, value = text.partition("=")
    if not name or not _:
        raise argparse.ArgumentTypeError(f"{text!r}: write a notebook parameter as name=value.")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def report(notebook_record: dict, hyperparameters: pd.DataFrame, stand_ins: dict) -> pd.DataFrame:
    """The notebook's stages (time between its laps), its merges and its peak memory, one row each."""
    rows, previous = [], 0.0
    for label, seconds in notebook_record["timings_seconds"].items():
        stage = label.split(": ", 1)[-1]
        rows.append((f"stage: {STAGES.get(stage, stage)}", round(seconds - previous, 1), "s"))
        previous = seconds
    rows.append(("notebook, in all", notebook_record["wall_time_seconds"], "s"))
    for method, seconds in zip(hyperparameters["method"], hyperparameters["merge seconds"]):
        rows.append((f"merge: {method}", float(seconds), "s"))
    peak = notebook_record.get("peak_memory", {})
    rows.append(("peak host memory (the kernel's resident set)", peak.get("host_rss_gib"), "GiB"))
    rows.append(("peak GPU memory (torch.cuda.max_memory_allocated)", peak.get("gpu_allocated_gib"), "GiB"))
    rows.append(("test images, all tasks", sum(s["test"] for s in stand_ins["split_sizes"].values()), "images"))
    rows.append(("writing the stand-ins (before the notebook)", stand_ins["seconds"], "s"))
    return pd.DataFrame(rows, columns=["what", "value", "unit"]).set_index("what")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=CLIP_ARCHS, default="ViT-B-32")
    parser.add_argument("--tasks", nargs="+", choices=PAPER_VISION_TASKS, default=list(PAPER_VISION_TASKS))
    parser.add_argument("--train-per-class", type=int, default=10, help="training images per class (validation: 10%%)")
    parser.add_argument("--test-per-class", type=int, default=5, help="test images per class")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer CLIP under the arch's names: checks the script")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "runs" / "rehearse_paper",
                        help="folder for the stand-ins (kept between runs) and the notebook's outputs")
    parser.add_argument("--param", type=parameter, action="append", default=[], metavar="NAME=VALUE",
                        help="a further notebook parameter (e.g. fisher_examples=64), repeatable")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                        help=f"write the report to {RECORD_DIR.relative_to(REPO_ROOT)}/ (default) or only under --work")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    files = args.work / "files"
    print(f"writing the stand-ins under {files} ...", flush=True)
    stand_ins = write_stand_ins(files, args.arch, args.tasks, args.train_per_class, args.test_per_class, args.tiny)
    out = args.work / "notebook"
    parameters = {"scale": "paper", "vision_tasks": args.tasks, "paper_vision_arch": args.arch,
                  "paper_vision_source": "huggingface", "data_dir": str(files / "data"),
                  "models_dir": str(files / "models"), "output_dir": str(out), "progress": False,
                  **dict(args.param)}
    import papermill

    # a cold run every time, in a cache of its own: the stand-ins' results never mix with real ones
    cache = args.work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    previous = os.environ.get("MERGE_CACHE_DIR")
    os.environ["MERGE_CACHE_DIR"] = str(cache)  # the notebook's kernel inherits it
    print(f"running {NOTEBOOK.relative_to(REPO_ROOT)} at paper scale into {out} ...", flush=True)
    try:
        papermill.execute_notebook(str(NOTEBOOK), str(args.work / "01_merging_baselines.executed.ipynb"),
                                   cwd=str(NOTEBOOK.parent), parameters=parameters, progress_bar=True)
    finally:
        if previous is None:
            os.environ.pop("MERGE_CACHE_DIR")
        else:
            os.environ["MERGE_CACHE_DIR"] = previous
    notebook_record = json.loads((out / "run.json").read_text())
    table = report(notebook_record, pd.read_csv(out / "merge_hyperparameters.csv"), stand_ins)
    device = notebook_record["machine"]["device"]
    shape = f"a tiny CLIP under {args.arch}'s names" if args.tiny else f"{args.arch}'s real shape"
    caption = (f"Notebook 01 at paper scale on random stand-ins of {shape} (lib.paper.rehearsal), {len(args.tasks)} "
               f"tasks, {args.train_per_class} training and {args.test_per_class} test images per class, on {device}: the notebook's stage times (between its "
               "laps), each merge's time, and the kernel's peak memory. Random weights: time and memory only.")
    run = Run("bench_paper_rehearsal", {**vars(args), "work": str(args.work), "param": dict(args.param),
                                        "notebook_parameters": parameters},
              out_dir=RECORD_DIR if args.record else args.work / "report", source="benchmarks/rehearse_paper.py",
              started=started)
    run.table(table, "rehearsal", caption)
    run.finish()
    print(caption + "\n\n" + table.to_markdown(floatfmt=".1f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
