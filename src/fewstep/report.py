"""Quality-vs-speed report of a sampling sweep: a markdown table, a CSV and FID-vs-NFE / FID-vs-time plots.

::

    python sample.py -m ckpt=PATH sampler=ddim,dpmpp_2m sampler.steps=5,10,20 n=2000 eval=true save_npz=false
    python -m fewstep.report logs/sample/multiruns/<time> [--out DIR] [--wandb]

Reads every ``summary.json`` under the sweep directory (one per Hydra job) and writes
``report.md``, ``report.csv`` and ``report.png`` (matplotlib, Agg) to ``--out`` (default: the
sweep directory). With ``--wandb`` the table and the plot also go to a W&B run (offline unless
W&B is configured; ``wandb sync`` uploads it later).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    "sampler",
    "steps",
    "nfe",
    "n",
    "seconds_per_image",
    "fid",
    "kid_mean",
    "kid_std",
    "is_mean",
    "is_std",
    "features",
    "spacing",
    "guidance_scale",
    "digit_adherence",
    "weight_adherence",
    "slant_adherence",
    "size_adherence",
    "run",
)
ADHERENCE = ("digit_adherence", "weight_adherence", "slant_adherence", "size_adherence")
SHOWN = {  # markdown column -> (header, format)
    "sampler": ("sampler", "{}"),
    "spacing": ("spacing", "{}"),
    "steps": ("steps", "{}"),
    "nfe": ("NFE", "{}"),
    "n": ("n", "{}"),
    "seconds_per_image": ("s / image", "{:.4g}"),
    "fid": ("FID", "{:.3f}"),
    "kid_mean": ("KID", "{:.4g}"),
    "is_mean": ("IS", "{:.3f}"),
    "features": ("features", "{}"),
    "guidance_scale": ("CFG scale", "{:g}"),
    "digit_adherence": ("digit adherence", "{:.1%}"),
    "weight_adherence": ("stroke adherence", "{:.1%}"),
    "slant_adherence": ("slant adherence", "{:.1%}"),
    "size_adherence": ("size adherence", "{:.1%}"),
    "run": ("run", "{}"),
}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` under ``sweep_dir`` that holds an FID, sorted by sampler and NFE."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist; pass the dir of a `sample.py -m` run")
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        raise FileNotFoundError(
            f"no summary.json under {root}; run e.g. python sample.py -m ckpt=PATH sampler=ddim,dpmpp_2m "
            "sampler.steps=5,10 eval=true first"
        )
    rows = []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read {path} ({type(err).__name__}); delete or fix it") from None
        if summary.get("fid") is None:
            continue
        row = {key: summary.get(key) for key in COLUMNS}
        row["guidance_scale"] = (summary.get("guidance") or {}).get("scale")
        row.update({key: (summary.get("adherence") or {}).get(key.removesuffix("_adherence")) for key in ADHERENCE})
        row["run"] = str(path.parent.relative_to(root)) or "."
        rows.append(row)
    if not rows:
        raise ValueError(f"none of the {len(paths)} summary.json under {root} has an FID; sample with eval=true")
    rows.sort(
        key=lambda r: (
            (str(r["sampler"]), str(r["spacing"]), str(r["features"]), r["nfe"] or 0, r["steps"] or 0)
            + (r["guidance_scale"] or 0,)
        )
    )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table, without the columns no row has a value in (adherence and CFG of unconditional sweeps)."""
    shown = [c for c in SHOWN if any(row.get(c) is not None for row in rows)]
    header = [SHOWN[c][0] for c in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        cells = [_fmt(SHOWN[c][1], row.get(c)) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(pattern: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Two panels, one line per sampler (and feature set): FID vs NFE, FID vs seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_features = len({r["features"] for r in rows}) > 1
    spacings: dict[str, set] = {}
    for row in rows:
        spacings.setdefault(str(row["sampler"]), set()).add(row["spacing"])
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:  # one line per sampler, and per spacing where a sampler was run with several
        label = str(row["sampler"])
        if len(spacings[label]) > 1:
            label += f" ({row['spacing']})"
        if several_features:
            label += f" [{row['features']}]"
        lines.setdefault(label, []).append(row)
    fig, (ax_nfe, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, points in lines.items():
        by_nfe = sorted(points, key=lambda r: r["nfe"] or 0)
        ax_nfe.plot([r["nfe"] for r in by_nfe], [r["fid"] for r in by_nfe], marker="o", label=label)
        by_time = sorted(points, key=lambda r: r["seconds_per_image"] or 0)
        ax_time.plot([r["seconds_per_image"] for r in by_time], [r["fid"] for r in by_time], marker="o", label=label)
    features = ", ".join(sorted({str(r["features"]) for r in rows}))
    ax_nfe.set(xlabel="NFE (network evaluations per sample)", ylabel=f"FID ({features})", title="FID vs NFE")
    ax_time.set(xlabel="seconds per image", ylabel="FID", title="FID vs sampling time")
    ax_nfe.set_xscale("log")
    ax_time.set_xscale("log")
    for ax in (ax_nfe, ax_time):
        ax.set_yscale("log")  # FID spans orders of magnitude between 5 NFE and convergence
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_adherence(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """FID against adherence (one panel per measured kind), one line per sampler, points labelled by CFG scale.

    Guidance moves a model along this curve: more adherence, at some point a worse FID.
    """
    kinds = [k for k in ADHERENCE if any(r.get(k) is not None for r in rows)]
    if not kinds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        lines: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row.get(kind) is not None:
                lines.setdefault(f"{row['sampler']} x{row['steps']}", []).append(row)
        for label, points in lines.items():
            points.sort(key=lambda r: r["guidance_scale"] or 0)
            ax.plot([r[kind] for r in points], [r["fid"] for r in points], marker="o", label=label)
            for r in points:
                ax.annotate(
                    f"w={r['guidance_scale']:g}",
                    (r[kind], r["fid"]),
                    fontsize=8,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set(xlabel=kind.replace("_", " "), ylabel="FID", title=f"FID vs {kind.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_wandb(rows: list[dict[str, Any]], image: Path, sweep_dir: Path, project: str, out_dir: Path) -> str:
    """The table and the plot as a W&B run (offline unless W&B is configured)."""
    import wandb

    from fewstep.config import wandb_offline

    run = wandb.init(
        project=project,
        job_type="report",
        name=f"report-{sweep_dir.name}",
        dir=str(out_dir),
        mode="offline" if wandb_offline() else "online",
        config={"sweep_dir": str(sweep_dir)},
    )
    table = wandb.Table(columns=list(COLUMNS), data=[[row.get(c) for c in COLUMNS] for row in rows])
    run.log({"quality_vs_speed": table, "quality_vs_speed_plot": wandb.Image(str(image))})
    location = run.dir
    run.finish()
    return location


def report(
    sweep_dir: str | Path, out_dir: str | Path | None = None, *, use_wandb: bool = False, project: str = "fewstep"
) -> dict[str, Any]:
    """Write report.md, report.csv and report.png for a sweep; return the rows and the paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    features = sorted({str(r["features"]) for r in rows})
    title = f"# Quality vs speed: {sweep_dir}\n\nFeatures: {', '.join(features)}. Lower FID/KID is better.\n\n"
    (out / "report.md").write_text(title + table + "\n![FID vs NFE and time](report.png)\n")
    paths = {
        "markdown": out / "report.md",
        "csv": write_csv(rows, out / "report.csv"),
        "plot": plot(rows, out / "report.png"),
    }
    adherence = plot_adherence(rows, out / "adherence.png")
    if adherence is not None:
        paths["adherence_plot"] = adherence
        with paths["markdown"].open("a") as handle:
            handle.write("\n![FID vs adherence](adherence.png)\n")
    result: dict[str, Any] = {"rows": rows, "table": table, "paths": paths}
    if use_wandb:
        result["wandb"] = log_wandb(rows, paths["plot"], sweep_dir, project, out)
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from fewstep.config import cli

    parser = argparse.ArgumentParser(prog="python -m fewstep.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a `sample.py -m ... eval=true` sweep dir (summary.json files below it)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the sweep dir)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plot to W&B")
    parser.add_argument("--project", default="fewstep", help="W&B project (with --wandb)")
    args = parser.parse_args(argv)

    def run() -> dict[str, Any]:
        result = report(args.sweep_dir, args.out, use_wandb=args.wandb, project=args.project)
        print(result["table"], end="")
        print("wrote " + ", ".join(str(p) for p in result["paths"].values()))
        return result

    return cli(run)()


if __name__ == "__main__":
    main()
