"""Inpainting, SDEdit and inversion on a trained checkpoint: quality against network evaluations.

    python benchmarks/editing.py --ckpt PATH [--n 200] [--repaint-n 32] [--out logs/bench/editing]
    python benchmarks/editing.py --ckpt PATH --plot-only --out logs/bench/editing   # redraw from results.json

On the checkpoint's held-out validation images (the first --n), with the fewstep classifier's
features (FID against the training set, the same n for every row, so rows compare with each other
but not with 2,000-sample FIDs) and its digit accuracy against the true label:

- inpainting, masks center / half / random strokes: RMSE of the filled pixels to the original
  ([0, 1] units), accuracy, FID; methods replace and ddnm with DPM-Solver++(2M) (Karras grid),
  ddnm with DDPM steps, and RePaint's resampling cut to the budget, at 5, 10, 20 and 50 NFE; then
  RePaint at its paper's setting (DDPM, 250 steps, jump 10, 10 resamplings; 2,500 NFE) on the first
  --repaint-n images as the reference, with its seconds per image;
- SDEdit (strength 0.2-0.8, DPM-Solver++(2M), grids sized so the run takes 10 / 50 NFE): FID
  against RMSE to the input;
- inversion round trip (invert, regenerate, RMSE to the input) against NFE for every ODE sampler
  (the first 32 images);
- class edits (a class-conditional checkpoint): the validation 3s inverted with label 3 and
  regenerated with label 8, with and without CFG, full and partial (strength 0.6) inversion: the
  share the classifier calls 8, RMSE to the input.

Models are run unconditionally (a conditional checkpoint with its null condition): the fill must come
from the known pixels. Results go to OUT/results.json, OUT/inpainting.png, OUT/sdedit.png, OUT/inversion.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fewstep.data import DataSource
from fewstep.diffusion.sampling import CountingDenoiser, sample_seeds
from fewstep.lit import load_model
from fewstep.sample import build_scores
from fewstep.samplers import SAMPLERS, SampleGenerators
from fewstep.tasks import INVERTIBLE, edit, inpaint, invert, make_masks, sdedit

BUDGETS = (5, 10, 20, 50)
# RePaint cut to a budget: (DDPM steps, resamplings) with jump length 2
REPAINT_CUT = {10: (5, 2), 20: (10, 2), 50: (10, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repaint-n", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--out", default="logs/bench/editing")
    parser.add_argument("--parts", default="inpaint,repaint,sdedit,invert,edit")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    if args.plot_only:
        plot(json.loads(results_path.read_text()), out)
        return
    torch.manual_seed(0)
    model = load_model(args.ckpt)
    model.eval()
    val = DataSource.from_config(model.hparams.data).setup().val_set
    items = [val[i] for i in range(min(args.n, len(val)))]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items])
    cfg = OmegaConf.create({"ckpt": args.ckpt, "features": {"name": "classifier"}, "evaluation": {"metrics": ["fid"]}})
    scores = build_scores(cfg, model, "cpu")
    classifier = scores.extractor
    denoiser = model.denoiser()
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def evaluate(result: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None, fid: bool = True) -> dict:
        """RMSE (filled pixels, or all), digit accuracy, FID of a set of results."""
        target = images[rows]
        weight = mask if mask is not None else torch.ones_like(result)
        rmse = math.sqrt(float(((result - target) ** 2 * weight).sum() / weight.expand_as(result).sum())) / 2
        with torch.no_grad():
            _, logits = classifier(result)
        accuracy = float((logits.argmax(1).cpu() == labels[rows]).float().mean())
        row = {"rmse": rmse, "accuracy": accuracy, "n": len(rows)}
        if fid:
            scores.reset()
            scores.update(result)
            row["fid"] = float(scores.compute()["fid"])
        return row

    def run(task, rows: torch.Tensor, **kwargs) -> tuple[torch.Tensor, float, float]:
        """A task over the rows in batches: results, NFE per image, seconds per image."""
        outs, nfe, seconds = [], 0.0, 0.0
        for begin in range(0, len(rows), args.batch_size):
            batch = rows[begin : begin + args.batch_size]
            counter = CountingDenoiser(denoiser, batch=len(batch))
            generator = SampleGenerators(sample_seeds(0, batch.tolist()))
            start = time.perf_counter()
            outs.append(task(counter, images[batch], batch, generator=generator, **kwargs).clamp(-1, 1))
            seconds += time.perf_counter() - start
            nfe = counter.calls
        return torch.cat(outs), nfe, seconds / len(rows)

    cond = model.condition(1)  # the null condition (unconditional) for a conditional model
    all_rows = torch.arange(len(images))
    parts = args.parts.split(",")

    if "inpaint" in parts or "repaint" in parts:
        masks = {kind: make_masks(kind, len(images), images.shape[-1], seed=0) for kind in ("center", "half", "random")}

        def inpaint_task(counter, image, batch, generator, kind, steps, **kw):
            spec = model.sampler_spec(kw["sampler"], steps=steps)  # the packaged config's options
            c = {k: v.expand(len(image), *v.shape[1:]) for k, v in cond.items()}
            grid, mask = spec.sigmas(model.schedule), masks[kind][batch]
            return inpaint(counter, image, mask, grid, generator=generator, cond=c, **spec.options, **kw)

        def record(key: str, kind: str, rows: torch.Tensor, fid: bool = True, **kw) -> None:
            result, nfe, seconds = run(inpaint_task, rows, kind=kind, **kw)
            results[key] = {**evaluate(result, rows, masks[kind][rows], fid), "nfe": nfe, "seconds_per_image": seconds}
            print(key, json.dumps(results[key]), flush=True)
            results_path.write_text(json.dumps(results, indent=1))

        if "inpaint" in parts:
            for kind in masks:
                for budget in BUDGETS:
                    record(
                        f"inpaint/{kind}/replace/{budget}",
                        kind,
                        all_rows,
                        method="replace",
                        sampler="dpmpp_2m",
                        steps=budget,
                    )
                    record(
                        f"inpaint/{kind}/ddnm/{budget}", kind, all_rows, method="ddnm", sampler="dpmpp_2m", steps=budget
                    )
                    record(
                        f"inpaint/{kind}/ddnm_ddpm/{budget}",
                        kind,
                        all_rows,
                        method="ddnm",
                        sampler="ddpm",
                        steps=budget,
                    )
                    if budget in REPAINT_CUT:
                        steps, resample = REPAINT_CUT[budget]
                        record(
                            f"inpaint/{kind}/repaint/{budget}", kind, all_rows, method="repaint", sampler="ddpm",
                            steps=steps, jump_length=2, resample=resample,
                        )  # fmt: skip
        if "repaint" in parts:
            few = all_rows[: args.repaint_n]
            for kind in masks:
                record(
                    f"inpaint/{kind}/repaint_paper/2500",
                    kind,
                    few,
                    fid=False,
                    method="repaint",
                    sampler="ddpm",
                    steps=250,
                )
                # the few-step rows on the same images, to compare RMSE / accuracy at equal n
                record(
                    f"inpaint/{kind}/ddnm_same_n/20", kind, few, fid=False, method="ddnm", sampler="dpmpp_2m", steps=20
                )

    if "sdedit" in parts:
        for budget in (10, 50):
            for strength in (0.2, 0.4, 0.6, 0.8):
                steps = round(budget / strength)

                def sdedit_task(counter, image, batch, generator, steps=steps, strength=strength):
                    grid = model.sampler_spec("dpmpp_2m", steps=steps).sigmas(model.schedule)
                    c = {k: v.expand(len(image), *v.shape[1:]) for k, v in cond.items()}
                    return sdedit(counter, image, strength, grid, sampler="dpmpp_2m", generator=generator, cond=c)

                result, nfe, seconds = run(sdedit_task, all_rows)
                key = f"sdedit/{budget}/{strength}"
                results[key] = {**evaluate(result, all_rows, None), "nfe": nfe, "seconds_per_image": seconds}
                print(key, json.dumps(results[key]), flush=True)
                results_path.write_text(json.dumps(results, indent=1))

    if "invert" in parts:
        rows = all_rows[:32]
        for name in INVERTIBLE:
            for budget in BUDGETS:
                if name == "heun" and budget < 3:
                    continue
                steps = (budget + 1) // 2 if name == "heun" else budget  # heun: 2 steps - 1 evaluations

                def round_trip(counter, image, batch, generator, name=name, steps=steps):
                    spec = model.sampler_spec(name, steps=steps)
                    grid, c = (
                        spec.sigmas(model.schedule),
                        {k: v.expand(len(image), *v.shape[1:]) for k, v in cond.items()},
                    )
                    latent = invert(counter, image, grid, sampler=name, cond=c, **spec.options)
                    return SAMPLERS[name](counter, latent, grid, cond=c, **spec.options)

                result, nfe, seconds = run(round_trip, rows)
                key = f"invert/{name}/{budget}"
                results[key] = {**evaluate(result, rows, None, fid=False), "nfe": nfe, "seconds_per_image": seconds}
                print(key, json.dumps(results[key]), flush=True)
                results_path.write_text(json.dumps(results, indent=1))
    if "edit" in parts and model.hparams.num_classes:
        source_label, target_label = 3, 8
        threes = torch.tensor([i for i, v in enumerate(labels.tolist()) if v == source_label])
        for name, steps in (("ddim", 10), ("dpmpp_2m", 10), ("dpmpp_2m", 20)):
            for strength in (1.0, 0.6):
                for scale in (1.0, 2.0):

                    def edit_task(
                        counter, image, batch, generator, name=name, steps=steps, strength=strength, scale=scale
                    ):
                        spec = model.sampler_spec(name, steps=steps)
                        n = len(image)
                        target = model.guidance(scale).wrap(counter)
                        return edit(
                            counter, image, spec.sigmas(model.schedule), source=model.condition(n, source_label),
                            target=model.condition(n, target_label), strength=strength, sampler=name,
                            target_denoiser=target, **spec.options,
                        )  # fmt: skip

                    result, nfe, seconds = run(edit_task, threes)
                    with torch.no_grad():
                        _, logits = classifier(result)
                    key = f"edit/{name}/{steps}/{strength}/{scale}"
                    results[key] = {
                        **evaluate(result, threes, None, fid=False),
                        "target_accuracy": float((logits.argmax(1) == target_label).float().mean()),
                        "nfe": nfe,
                        "seconds_per_image": seconds,
                    }
                    print(key, json.dumps(results[key]), flush=True)
                    results_path.write_text(json.dumps(results, indent=1))
    plot(results, out)


def plot(results: dict, out: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inpaint_keys = [
        k.split("/") for k in results if k.startswith("inpaint/") and "_paper" not in k and "same_n" not in k
    ]
    kinds = sorted({k[1] for k in inpaint_keys})
    methods = sorted({k[2] for k in inpaint_keys})
    if kinds:
        fig, axes = plt.subplots(2, len(kinds), figsize=(4.2 * len(kinds), 6.2), squeeze=False)
        for column, kind in enumerate(kinds):
            for row, metric in enumerate(("rmse", "accuracy")):
                ax = axes[row][column]
                for method in methods:
                    keys = [
                        f"inpaint/{kind}/{method}/{b}" for b in BUDGETS if f"inpaint/{kind}/{method}/{b}" in results
                    ]
                    points = sorted((results[k]["nfe"], results[k][metric]) for k in keys)
                    ax.plot(*zip(*points, strict=True), marker="o", label=method)
                ref = results.get(f"inpaint/{kind}/repaint_paper/2500")
                if ref:
                    ax.axhline(
                        ref[metric], color="grey", ls="--", label=f"RePaint 250x10 ({ref['nfe']:g} NFE, n={ref['n']})"
                    )
                ax.set_xscale("log")
                ax.set_xticks(BUDGETS, [str(b) for b in BUDGETS])
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
                ax.set(
                    xlabel="network evaluations", ylabel="RMSE of the filled pixels" if row == 0 else "digit accuracy"
                )
                if row == 0:
                    ax.set_title(f"mask: {kind}")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "inpainting.png", dpi=110)
    sd = [k.split("/") for k in results if k.startswith("sdedit/")]
    if sd:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for budget in sorted({int(k[1]) for k in sd}):
            pts = sorted(
                (results[f"sdedit/{budget}/{k[2]}"]["rmse"], results[f"sdedit/{budget}/{k[2]}"]["fid"], k[2])
                for k in sd
                if int(k[1]) == budget
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{budget} NFE")
            for r, f, s in pts:
                ax.annotate(s, (r, f), fontsize=7)
        ax.set(xlabel="RMSE to the input (faithfulness)", ylabel="FID (realism)", title="SDEdit, strength 0.2-0.8")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sdedit.png", dpi=120)
    inv = [k.split("/") for k in results if k.startswith("invert/")]
    if inv:
        fig, ax = plt.subplots(figsize=(4.5, 3.4))
        for name in dict.fromkeys(k[1] for k in inv):
            pts = sorted(
                (results[f"invert/{name}/{b}"]["nfe"], results[f"invert/{name}/{b}"]["rmse"])
                for b in BUDGETS
                if f"invert/{name}/{b}" in results
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="network evaluations (invert + regenerate)", ylabel="round-trip RMSE")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "inversion.png", dpi=120)


if __name__ == "__main__":
    main()
