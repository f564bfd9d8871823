"""FID of distilled students against their teacher, on one chart (FID against NFE).

    python benchmarks/distillation.py --teacher T.ckpt --progressive RUN_DIR --consistency RUN_DIR \
        [--n 2000] [--ddpm-n 0] [--out logs/bench/distillation]

Every row draws ``--n`` samples with the same seed, without guidance (labels drawn uniformly for a
class-conditional teacher, the same labels in every row) and scores them with the fewstep classifier's features (FID
against the training set). Rows: the teacher with dpmpp_2m (Karras) at 10 NFE and with DDIM at the
progressive teacher's steps; each progressive round's student (``round-*.ckpt``) with DDIM at its
steps; the consistency student (``last.ckpt``) with 1, 2 and 4 consistency steps; with
``--ddpm-n`` > 0 the teacher with 1000-step DDPM on that many samples (slow on a CPU).
Results: OUT/results.json and OUT/fid_vs_nfe.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fewstep.lit import load_model
from fewstep.sample import build_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--progressive", default=None)
    parser.add_argument("--consistency", default=None)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--ddpm-n", type=int, default=0)
    parser.add_argument("--out", default="logs/bench/distillation")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(args.teacher)
    cfg = OmegaConf.create(
        {"ckpt": args.teacher, "features": {"name": "classifier"}, "evaluation": {"metrics": ["fid"]}}
    )
    scores = build_scores(cfg, teacher, "cpu")
    results: dict[str, dict] = {}

    def score(name: str, model, n: int, **sample_kwargs) -> None:
        k = model.hparams.num_classes
        labels = torch.randint(k, (n,), generator=torch.Generator().manual_seed(0)) if k else None
        start = time.perf_counter()
        # no guidance in any row: the students learned the unguided teacher (guidance_scale 1)
        result = model.sample(n, seed=0, y=labels, batch_size=250, guidance=1.0, return_result=True, **sample_kwargs)
        seconds = time.perf_counter() - start
        scores.reset()
        scores.update(result.images)
        fid = float(scores.compute()["fid"])
        results[name] = {"fid": fid, "nfe": result.nfe, "n": n, "seconds_per_image": seconds / n}
        print(f"{name:42s} NFE {result.nfe:>4g}  FID {fid:7.2f}  ({seconds / n * 1000:.1f} ms/image)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))

    score("teacher dpmpp_2m karras", teacher, args.n, sampler="dpmpp_2m", steps=10, spacing="karras")
    if args.progressive:
        rounds = sorted(Path(args.progressive, "checkpoints").glob("round-*.ckpt"))
        if rounds:
            first = load_model(rounds[0])
            teacher_steps = first.hparams.distillation["teacher_steps"]
            score(f"teacher ddim (trailing) {teacher_steps}", teacher, args.n, sampler="ddim", steps=teacher_steps)
        for path in rounds:
            student = load_model(path)
            steps = student.hparams.sampler["steps"]
            score(f"progressive student {steps} steps ({path.name})", student, args.n)
    if args.consistency:
        student = load_model(Path(args.consistency, "checkpoints", "last.ckpt"))
        for steps in (1, 2, 4):
            score(f"consistency student {steps} steps", student, args.n, sampler="consistency", steps=steps)
    if args.ddpm_n:
        score("teacher ddpm 1000", teacher, args.ddpm_n, sampler="ddpm", steps=1000)
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    groups = {"progressive": [], "consistency": [], "teacher": []}
    for name, row in results.items():
        groups[name.split()[0]].append((row["nfe"], row["fid"], name))
    for group, marker in (("progressive", "o-"), ("consistency", "s-")):
        if groups[group]:
            points = sorted(groups[group])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker, label=f"{group} student")
    for nfe, fid, name in groups["teacher"]:
        ax.plot([nfe], [fid], "k*", markersize=9)
        ax.annotate(name.replace("teacher ", ""), (nfe, fid), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="FID (classifier features)")
    ax.set_title("students vs teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_nfe.png", dpi=120)


if __name__ == "__main__":
    main()
