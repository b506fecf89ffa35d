"""A researcher's own tasks through notebook 01, exactly as the README's "Add your own task"
section tells them to run it: an image folder and a CSV file made here, the README's commands
with only the paths swapped (and tiny budgets appended), under papermill's command line. The
committed figures must come out untouched."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, SHARED_MODELS, needs_data, needs_models

REPO = Path(__file__).resolve().parents[1]
TINY = ["-p", "max_validation", "16", "-p", "max_test", "24", "-p", "lambda_grid", "[0.0, 0.5, 1.0]",
        "-p", "fisher_examples", "8", "-p", "regmean_examples", "16", "-p", "selection_examples", "8",
        "-p", "vision_max_steps", "3", "-p", "text_max_steps", "3", "-p", "eval_every", "3",
        "-p", "multitask_steps_per_task", "2", "-p", "spread_seeds", "[]", "-p", "batchnorm_examples", "32",
        "-p", "progress", "False"]


def readme_commands() -> list[str]:
    """The shell commands of the README's own-task examples (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- own-task examples -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md lost its <!-- own-task examples --> block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def make_image_folder(root: Path) -> Path:
    """Three classes named 0, 2 and 10 (string order would put 10 before 2), 20 images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "my_images"
    for k, name in enumerate(["0", "2", "10"]):
        (folder / name).mkdir(parents=True)
        for i in range(20):
            pixels = np.clip(rng.normal(60 + 70 * k, 25, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


def make_csv(root: Path) -> Path:
    rng = np.random.default_rng(0)
    good = ["a wonderful, moving film", "great acting and a clever plot", "I loved every minute"]
    bad = ["a dull, boring mess", "terrible dialogue and no plot", "I walked out, it was awful"]
    rows = [(int(y), rng.choice(bad if y == 0 else good)) for y in rng.permutation(np.arange(60) % 2)]
    path = root / "my_reviews.csv"
    pd.DataFrame(rows, columns=["label", "text"]).to_csv(path, index=False)  # quotes the commas
    return path


@needs_models
@needs_data("vision/usps.npz", "text/senteval/stsa.binary.train")
def test_readme_own_task_examples_run_as_written_and_leave_committed_figures_alone(tmp_path):
    commands = readme_commands()
    assert len(commands) == 2 and all("papermill" in c for c in commands)
    # The executed notebook's /tmp/ path first: the paths swapped in after it contain /tmp/ themselves.
    swap = {"/tmp/": f"{tmp_path}/", "/data/my_images": str(make_image_folder(tmp_path)),
            "/data/my_reviews.csv": str(make_csv(tmp_path)), "../shared/data": str(SHARED_DATA),
            "../.venv/bin/python": sys.executable}
    committed = {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
    for n, command in enumerate(commands):
        for old, new in swap.items():
            command = command.replace(old, new)
        assert command.startswith("cd notebooks && ")
        args = shlex.split(command.removeprefix("cd notebooks && "))
        out = tmp_path / f"out{n}"
        args += TINY + ["-p", "models_dir", str(SHARED_MODELS), "-p", "output_dir", str(out)]
        done = subprocess.run(args, cwd=REPO / "notebooks", capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        table = pd.read_csv(next(out.glob("*_baselines.csv")), index_col=0)
        own = "my_images" if "vision" in command else "my_reviews"
        assert own in table.columns  # the task by its name, not its path
        assert not any("/" in c for c in table.columns)
    assert committed == {p: p.stat().st_mtime_ns for p in (REPO / "figures").rglob("*") if p.is_file()}
