"""Benchmark calibration (notebook 00): which small-scale track design gives merging the
headroom it has in the papers?

In the papers (CLIP ViT-B/32, 8 tasks) θ0 with frozen zero-shot heads keeps 53% of the experts'
accuracy, Task Arithmetic ~76% and TIES ~80%: merging recovers most of a large gap. A design here
is a head kind × backbone × training budget (``Design``); for each, the experts are trained and
θ0 + heads, the experts, weight averaging, Task Arithmetic and TIES are measured on the
**validation** split (λ chosen on a validation subset by ``selection.select``; the test split is
never read here).

The criterion was written down before any design was run (issue "Benchmark v2"):

1. θ0 + heads between 40% and 70% normalized;
2. the best closed-form merge at most 88% normalized (room left for AdaMerging and Twin-Merging);
3. Task Arithmetic and TIES each at least 10 normalized points above θ0 + heads.

The default is, among the designs that meet all three, the one whose θ0 + heads is closest to
the paper's 53% (ties: the cheaper one). When none meets them, the design with the smallest total
shortfall (the points by which it misses each condition, summed) is named the closest, and the
findings say that the criterion was not met.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .. import merging
from .config import settings_for
from .baselines import EXPERTS, PAPER_VIT_B32, PRETRAINED, BaselinesConfig, closed_form_merges, evaluate_methods, prepare_track

THETA0_RANGE = (40.0, 70.0)
BEST_MERGE_MAX = 88.0
MIN_GAIN = 10.0
MERGES = ("weight_average", "task_arithmetic", "ties")
# The paper's headroom, normalized by the experts' average (METHODS.md §7; an average of ratios
# there, a ratio of averages here: close enough to read the two side by side).
PAPER_NORMALIZED = {row: round(100 * PAPER_VIT_B32[row] / PAPER_VIT_B32["Individual experts"], 1)
                    for row in ("Pretrained", "Weight averaging", "Task Arithmetic", "TIES")}


@dataclass
class CalibrationConfig:
    """Every setting of notebook 00. The fields are its papermill parameters."""

    scale: str = "small"
    tracks: tuple[str, ...] = ("vision", "text")  # designs run in this order
    text_tasks: tuple[str, ...] = BaselinesConfig.text_tasks
    vision_tasks: tuple[str, ...] = ("mnist", "fashion_mnist", "usps", "gtsrb", "eurosat", "kmnist", "mnist_m")
    data_dir: str = ""
    models_dir: str = ""
    output_dir: str = ""            # "" = figures/00_benchmark_calibration
    seed: int = 0
    # the candidate designs: every combination of these per track
    # Linear probes on θ0 ("probe", the first benchmark's heads) are not re-run by default: notebook
    # 01 measured them (θ0 + probe heads kept 88% / 81% of the experts), far above the 40-70% band.
    # Pass them here to include them.
    text_heads: tuple[str, ...] = ("zero_shot",)
    vision_heads: tuple[str, ...] = ("joint", "few_shot")
    vision_backbones: tuple[str, ...] = ("resnet20",)
    text_max_steps: tuple[int, ...] = (400,)
    vision_max_steps: tuple[int, ...] = (500,)
    head_shots: int = 16
    # training and selection (as notebook 01)
    text_batch_size: int = 32
    text_lr: float = 1e-4
    vision_batch_size: int = 128
    vision_lr: float = 1e-3
    eval_every: int = 50
    patience: int = 2
    max_validation: int = 500
    lambda_grid: tuple[float, ...] = merging.LAMBDA_GRID
    lambda_refinements: int = 0     # the full grid, as the committed calibration ran
    selection_examples: int = 100
    progress: bool = True

    def __post_init__(self):
        if self.scale != "small":
            raise ValueError(f"scale={self.scale!r}: calibration is about the small-scale tracks; the paper "
                             "scale uses the papers' models and heads as they are.")
        for name in self.tracks:
            if name not in ("text", "vision"):
                raise ValueError(f"tracks: unknown track {name!r}; choose from 'text', 'vision'.")

    def designs(self) -> list["Design"]:
        """Every combination, track by track in the order of ``tracks``."""
        per_track = {
            "text": [Design("text", h, "minilm-l6", s) for h in self.text_heads for s in self.text_max_steps],
            "vision": [Design("vision", h, b, s) for h in self.vision_heads for b in self.vision_backbones
                       for s in self.vision_max_steps],
        }
        return [d for name in self.tracks for d in per_track[name]]

    def baselines_config(self, design: "Design") -> BaselinesConfig:
        """Notebook 01's config for one design: the same code trains, merges and selects."""
        axes = {"tracks", "text_heads", "vision_heads", "text_max_steps", "vision_max_steps", "output_dir"}
        design_fields = {"tracks": (design.track,), f"{design.track}_heads": design.heads,
                         f"{design.track}_max_steps": design.max_steps}
        if design.track == "vision":
            design_fields["vision_backbone"] = design.backbone
        return settings_for(BaselinesConfig, self, exclude=axes, **design_fields)


@dataclass(frozen=True)
class Design:
    track: str
    heads: str
    backbone: str
    max_steps: int

    @property
    def label(self) -> str:
        return f"{self.track}: {self.heads} heads, {self.backbone}, ≤{self.max_steps} steps"


@dataclass
class DesignResult:
    design: Design
    table: pd.DataFrame            # long, validation split: method × task
    training: pd.DataFrame         # per expert: steps, best step, stopped early, seconds
    seconds: float
    notes: list[str] = field(default_factory=list)


def run_design(config: CalibrationConfig, design: Design, progress: bool = True) -> DesignResult:
    """Experts of one design (cached), then θ0 + heads, experts and three merges on validation."""
    started = time.perf_counter()
    base = config.baselines_config(design)
    track = base.track(design.track)
    expert_config, _ = base.finetune_configs(design.track, len(track.tasks))
    setup = prepare_track(track, expert_config, None, progress=progress)
    merged = closed_form_merges(track, setup, {}, base, methods=MERGES, progress=progress)
    table, _ = evaluate_methods(track, setup, merged, progress=progress, split="validation")
    training = pd.DataFrame([{"task": t, "steps": e.info.get("steps"), "best step": e.info.get("best_step"),
                              "stopped early": e.info.get("stopped_early"), "seconds": e.info.get("seconds")}
                             for t, e in setup.experts.items()])
    notes = [f"{label}: {r.selection.note}" for label, r in merged.items() if r.selection and r.selection.note]
    return DesignResult(design, table, training, time.perf_counter() - started, notes)


# ----------------------------------------------------------------------------- the table and the choice
def _normalized(table: pd.DataFrame, method: str) -> float:
    return float(table[table.method == method]["normalized"].mean())


def _accuracy(table: pd.DataFrame, method: str) -> float:
    return float(table[table.method == method]["accuracy"].mean())


def criterion(theta0: float, ta: float, ties: float, best_merge: float) -> dict[str, float]:
    """How far a design misses each condition, in normalized points (0 = met)."""
    low, high = THETA0_RANGE
    return {
        "θ0 in range": max(0.0, low - theta0, theta0 - high),
        "best merge ≤ max": max(0.0, best_merge - BEST_MERGE_MAX),
        "TA, TIES gain": max(0.0, MIN_GAIN - (ta - theta0), MIN_GAIN - (ties - theta0)),
    }


def calibration_table(results: list[DesignResult]) -> pd.DataFrame:
    """One row per design: accuracies and normalized scores (validation), gains over θ0 + heads,
    each condition's shortfall and whether all are met, and what training cost."""
    labels = {m: merging.REGISTRY[m].label for m in MERGES}
    rows = []
    for r in results:
        t, d = r.table, r.design
        norm = {m: _normalized(t, labels[m]) for m in MERGES}
        theta0 = _normalized(t, PRETRAINED)
        misses = criterion(theta0, norm["task_arithmetic"], norm["ties"], max(norm.values()))
        rows.append({
            "track": d.track, "heads": d.heads, "backbone": d.backbone, "max steps": d.max_steps,
            "experts acc.": _accuracy(t, EXPERTS), "θ0 + heads acc.": _accuracy(t, PRETRAINED),
            "θ0 + heads norm.": theta0,
            **{f"{labels[m]} norm.": norm[m] for m in MERGES},
            "TA − θ0": norm["task_arithmetic"] - theta0, "TIES − θ0": norm["ties"] - theta0,
            **{f"miss: {k}": v for k, v in misses.items()},
            "meets criterion": all(v == 0 for v in misses.values()),
            "experts stopped early": f"{int(r.training['stopped early'].sum())}/{len(r.training)}",
            "training min": r.training["seconds"].sum() / 60,
        })
    return pd.DataFrame(rows).round(1)


def choose(table: pd.DataFrame, track: str) -> tuple[pd.Series, bool]:
    """The design of ``track`` chosen by the rule in this module's docstring, and whether it meets
    the criterion (False: it is only the closest)."""
    rows = table[table.track == track]
    if rows.empty:
        raise ValueError(f"no calibrated design of the {track} track in the table.")
    met = rows[rows["meets criterion"]]
    if len(met):
        distance = (met["θ0 + heads norm."] - PAPER_NORMALIZED["Pretrained"]).abs()
        order = np.lexsort((met["training min"].to_numpy(), distance.to_numpy()))
        return met.iloc[order[0]], True
    shortfall = rows[[c for c in rows.columns if c.startswith("miss: ")]].sum(axis=1)
    return rows.loc[shortfall.idxmin()], False


def findings(table: pd.DataFrame) -> str:
    """The criterion, each track's chosen design and its headroom next to the paper's (markdown)."""
    lines = ["# Benchmark calibration (small scale, validation split)", "",
             "Criterion, fixed before any design was run: θ0 + heads at "
             f"{THETA0_RANGE[0]:g}–{THETA0_RANGE[1]:g}% normalized; the best closed-form merge at most "
             f"{BEST_MERGE_MAX:g}%; Task Arithmetic and TIES each at least {MIN_GAIN:g} points above θ0 + heads. "
             "Among the designs that meet it, the one whose θ0 + heads is closest to the paper's "
             f"{PAPER_NORMALIZED['Pretrained']:g}% (ties: the cheaper).", ""]
    paper = PAPER_NORMALIZED
    for track in dict.fromkeys(table.track):
        row, met = choose(table, track)
        design = f"{row['heads']} heads, {row['backbone']}, ≤{row['max steps']} steps"
        if met:
            lines.append(f"- **{track}**: chosen design: {design} (meets the criterion).")
        else:
            misses = ", ".join(f"{c.removeprefix('miss: ')} by {row[c]:.1f} points"
                               for c in table.columns if c.startswith("miss: ") and row[c] > 0)
            lines.append(f"- **{track}**: no design meets the criterion. Closest: {design}, which misses {misses}.")
        lines.append(f"  Normalized headroom here vs the paper (CLIP ViT-B/32, 8 tasks): θ0 + heads "
                     f"{row['θ0 + heads norm.']:.1f} vs {paper['Pretrained']:.1f}; weight averaging "
                     f"{row['Weight averaging norm.']:.1f} vs {paper['Weight averaging']:.1f}; Task Arithmetic "
                     f"{row['Task Arithmetic norm.']:.1f} vs {paper['Task Arithmetic']:.1f}; TIES "
                     f"{row['TIES norm.']:.1f} vs {paper['TIES']:.1f}; experts 100 vs 100 "
                     f"(expert accuracy {row['experts acc.']:.1f}%).")
    lines += ["", "Validation numbers: λ was chosen on a subset of the same split, so the merges' numbers are "
              "slightly optimistic; notebook 01 reports test numbers for the chosen design."]
    return "\n".join(lines) + "\n"


def plot_calibration(table: pd.DataFrame):
    """Normalized θ0 + heads, TA and TIES per design, with the criterion's bands and the paper's values."""
    fig, axes = plt.subplots(1, len(set(table.track)), figsize=(6 * len(set(table.track)), 4), squeeze=False)
    for ax, (track, rows) in zip(axes[0], table.groupby("track", sort=False)):
        labels = [f"{h}\n{b}\n≤{s}" for h, b, s in zip(rows.heads, rows.backbone, rows["max steps"])]
        x = np.arange(len(rows))
        for i, (column, name) in enumerate([("θ0 + heads norm.", "θ0 + heads"), ("Weight averaging norm.", "weight avg."),
                                            ("Task Arithmetic norm.", "Task Arithmetic"), ("TIES norm.", "TIES")]):
            ax.bar(x + (i - 1.5) * 0.2, rows[column], 0.2, label=name)
        ax.axhspan(*THETA0_RANGE, color="grey", alpha=0.12, label="θ0 + heads target")
        ax.axhline(BEST_MERGE_MAX, color="k", ls="--", lw=1, label=f"best merge ≤ {BEST_MERGE_MAX:g}")
        ax.axhline(PAPER_NORMALIZED["Pretrained"], color="C0", ls=":", lw=1, label="paper θ0")
        ax.axhline(PAPER_NORMALIZED["TIES"], color="C3", ls=":", lw=1, label="paper TIES")
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("normalized score (%), validation")
        ax.set_title(f"{track} track designs (small scale)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
