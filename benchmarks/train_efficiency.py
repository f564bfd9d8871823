"""Which training setup reaches a given FID in the least CPU time? Trains candidate configs for equal budgets,
interleaved, and scores each with FID.

    python benchmarks/train_efficiency.py --steps 1000 --out eff.json      # ~2 h on 2 CPU cores (see below)
    python benchmarks/train_efficiency.py --minutes 10 --evals 2           # 10 wall-minutes of training each
    python benchmarks/train_efficiency.py --steps 5 --fid-samples 64       # smoke test (~1 min)
    python benchmarks/train_efficiency.py --candidates default diffusers --steps 100 --fid-samples 0  # img/s only

Candidates (``--candidates``; each is conf/train.yaml with ``model=tiny`` unless it names another model,
plus the common Hydra overrides given last):

    default         the defaults with the tiny U-Net (eps prediction, uniform loss weights), fp32
    tiny_fast       model=tiny_fast: as many parameters as tiny (-2.4 %), narrow at 32x32 and 16x16, a 4x4 level
    tiny_fast_edm   tiny_fast trained as EDM trains (Karras et al. 2022): its preconditioning (module.prediction=edm,
                    sigma_data 0.6, the std of MNIST in [-1, 1]) and log-normal noise levels (P_mean -1.2, P_std 1.2)
    min_snr         module.loss_weighting=min_snr (Hang et al. 2023)
    v               module.prediction=v (Salimans & Ho 2022)
    channels_last   the default network and batches in channels-last memory format
    bf16            bf16 autocast (what trainer.precision=bf16-mixed does; auto picks it on CPUs where it is faster)
    diffusers       diffusers' UNet2DModel with the tiny U-Net's layout (32-64-64 channels, one res block a level,
                    attention at 8x8: 1,112,801 parameters, as many as fewstep's), as the network of the same
                    DiffusionModel through :class:`DiffusersUNet`
    diffusers_bf16  the same UNet2DModel under bf16 autocast, to set beside ``bf16``
    compiled        the default network through ``torch.compile`` (inductor), fp32; its compile time is in
                    its wall- and CPU-minutes (the first steps), not in its images/s (``--warmup``)
    compiled_bf16   the same under bf16 autocast

Time: with OMP_NUM_THREADS=1 on a 2-core machine an fp32 candidate takes ~1.3 s a step at batch 64
(bf16 ~0.8 s), so the nine candidates x 1000 steps take ~3 h, plus ~2 min per FID of 2,000 samples. On a
shared machine use one thread per process: oversubscribed OpenMP threads make steps 5-20x slower.

Budgets: ``--steps`` optimizer steps or ``--minutes`` wall-minutes of training per candidate. The
candidates train round-robin, ``--chunk`` steps at a time, so that the load of a shared machine
falls on all of them alike; each keeps its own RNG state, so its run does not depend on the others.
Every candidate sees the same batches: the training split of the data config held in memory,
reshuffled each epoch with the same seed (the data loader's cost is left out of every timing).

The loop is plain PyTorch, not Lightning: ``DiffusionModel.training_step`` (the same loss,
condition dropout and NaN check as train.py), backward, gradient clipping (trainer.gradient_clip_val),
the module's AdamW and learning-rate schedule (``configure_optimizers``; a ``--steps`` budget is the
length its decay spans, a ``--minutes`` budget trains at a constant rate), then the EMA update, the order
of ``DiffusionModel.optimizer_step``. It leaves out Lightning's per-step overhead (hooks, logging),
which is the same for every candidate.

Scores: FID of ``--fid-samples`` EMA samples (``dpmpp_2m``, karras spacing, 10 steps = 10 NFE, the
same seed for every candidate) against the training split, with the classifier features of
``src/fewstep/metrics`` (trained once and cached under ``--cache-dir``, like the FID callback), at
``--evals`` evenly spaced points of the budget. Reported per candidate: steps, CPU-minutes (the
process's CPU time while training, all threads), wall-minutes, training images/s, FID. And the
ratio of training images/s of fewstep's tiny U-Net (``default``) to diffusers' UNet2DModel
(``diffusers``): both fp32, the same batch, interleaved; the first ``--warmup`` steps not timed.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch import Tensor, nn

from fewstep.config import CONFIG_DIR, register_resolvers
from fewstep.lit import DiffusionModel, ImageDataModule
from fewstep.metrics import GenerativeScores, build_features, reference_stats
from fewstep.precision import cpu_name
from fewstep.train import build_model

# fewstep.nn.UNet of conf/model/tiny.yaml, in diffusers' terms.
DIFFUSERS_TINY = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DModel`` with fewstep's network interface: ``net(x, t, *, y=None, ...) -> Tensor``.

    ``t`` is the (fractional) training timestep, as UNet2DModel's sinusoidal embedding expects;
    class labels (``num_classes`` of them plus the null one) go to its class embedding. Text
    conditions are not supported (UNet2DModel has no cross-attention).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int | None = None,
        context_dim: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if context_dim is not None:
            raise ValueError("DiffusersUNet (UNet2DModel) takes no text condition; drop text_encoder=")
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_class_embeds=num_classes + 1 if num_classes else None,
            **options,
        )

    def forward(self, x: Tensor, t: Tensor, *, y: Tensor | None = None, **unused: Any) -> Tensor:
        return self.unet(x, t, class_labels=y).sample


@dataclass
class Candidate:
    name: str
    overrides: list[str] = field(default_factory=list)
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    net: dict[str, Any] | None = None


CANDIDATES = {
    "default": Candidate("default"),
    "tiny_fast": Candidate("tiny_fast", ["model=tiny_fast"]),
    "tiny_fast_edm": Candidate(
        "tiny_fast_edm",
        ["model=tiny_fast", "module.prediction=edm", "module.noise_levels=log_normal", "module.sigma_data=0.6"],
    ),
    "min_snr": Candidate("min_snr", ["module.loss_weighting=min_snr"]),
    "v": Candidate("v", ["module.prediction=v"]),
    "channels_last": Candidate("channels_last", channels_last=True),
    "bf16": Candidate("bf16", bf16=True),
    "compiled": Candidate("compiled", compile=True),
    "compiled_bf16": Candidate("compiled_bf16", bf16=True, compile=True),
    "diffusers": Candidate("diffusers", net={"_target_": f"{__name__}.DiffusersUNet", **DIFFUSERS_TINY}),
    "diffusers_bf16": Candidate(
        "diffusers_bf16", bf16=True, net={"_target_": f"{__name__}.DiffusersUNet", **DIFFUSERS_TINY}
    ),
}


class Batches:
    """The training split in memory; batch ``i`` of a run is the same for every candidate."""

    def __init__(self, datamodule: ImageDataModule, batch_size: int, seed: int) -> None:
        datamodule.setup("fit")
        items = [datamodule.train_set[i] for i in range(len(datamodule.train_set))]
        self.images = torch.stack([item[0] for item in items])
        self.labels = torch.as_tensor([int(item[1]) for item in items])
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(self.images) // batch_size
        self._order: dict[int, Tensor] = {}

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(len(self.images), generator=torch.Generator().manual_seed(epoch))}
        rows = self._order[epoch][i * self.batch_size : (i + 1) * self.batch_size]
        return self.images[rows], self.labels[rows]


class Run:
    """One candidate's model, optimizer, RNG state and clocks."""

    def __init__(
        self, candidate: Candidate, cfg: Any, datamodule: ImageDataModule, args: argparse.Namespace, seed: int
    ) -> None:
        self.candidate, self.args, self.seed = candidate, args, seed
        torch.manual_seed(seed)
        self.model: DiffusionModel = build_model(cfg, datamodule)
        self.model.train()
        if candidate.channels_last:
            self.model.net.to(memory_format=torch.channels_last)
            if self.model.ema is not None:
                self.model.ema.module.to(memory_format=torch.channels_last)
        if candidate.compile:
            self.model.net.compile()  # in place: the state dict keeps its keys; compiled at the first step (timed)
        optimizers = self.model.configure_optimizers()
        self.optimizer = optimizers["optimizer"]
        self.scheduler = optimizers["lr_scheduler"]["scheduler"]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = cfg.trainer.get("gradient_clip_val")
        self.rng = torch.get_rng_state()
        self.parameters = sum(p.numel() for p in self.model.net.parameters())
        self.steps = 0
        self.wall = self.cpu = 0.0  # training only
        self.timed_wall, self.timed_images = 0.0, 0  # after the warm-up steps
        self.scores: list[dict[str, Any]] = []

    def done(self) -> bool:
        if self.args.minutes is not None:
            return self.wall >= 60 * self.args.minutes
        return self.steps >= self.args.steps

    def progress(self) -> float:
        return self.wall / (60 * self.args.minutes) if self.args.minutes is not None else self.steps / self.args.steps

    def train(self, batches: Batches, count: int) -> None:
        torch.set_rng_state(self.rng)
        model = self.model
        for _ in range(count):
            if self.done():
                break
            x0, y = batches[self.steps]
            if self.candidate.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            wall, cpu = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.candidate.bf16):
                loss = model.training_step((x0, y), self.steps)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
            self.scheduler.step()
            if model.ema is not None:
                model.ema.update_parameters(model.net)
            seconds = time.perf_counter() - wall
            self.wall += seconds
            self.cpu += time.process_time() - cpu
            if self.steps >= self.args.warmup:
                self.timed_wall += seconds
                self.timed_images += len(x0)
            self.steps += 1
        self.rng = torch.get_rng_state()

    @property
    def images_per_second(self) -> float | None:
        return self.timed_images / self.timed_wall if self.timed_wall > 0 else None

    def evaluate(self, scores: GenerativeScores | None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": self.steps,
            "cpu_minutes": self.cpu / 60,
            "wall_minutes": self.wall / 60,
            "fid": None,
        }
        if scores is not None:
            start = time.perf_counter()
            scores.reset()
            n, batch = self.args.fid_samples, self.args.fid_batch
            nfe = 0.0
            for begin in range(0, n, batch):
                size = min(batch, n - begin)
                result = self.model.sample(
                    size, "dpmpp_2m", steps=10, seed=0, first_index=begin, batch_size=size, return_result=True
                )
                scores.update(result.images)
                nfe = max(nfe, result.nfe)
            self.model.train()
            record.update(fid=float(scores.compute()["fid"]), nfe=nfe, eval_seconds=time.perf_counter() - start)
        self.scores.append(record)
        return record


def compose_config(candidate: Candidate, overrides: list[str]) -> Any:
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        # Every candidate is the tiny U-Net unless it (or the command line) names a model: the
        # default's network before model=tiny_fast, which diffusers' candidate mirrors.
        named = any(o.startswith("model=") for o in [*candidate.overrides, *overrides])
        base = [] if named else ["model=tiny"]
        cfg = compose("train", overrides=["data.root=data", *base, *candidate.overrides, *overrides])
    if candidate.net is not None:
        with open_dict(cfg):
            cfg.model.net = candidate.net
    return cfg


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps per candidate (default 1000)")
    budget.add_argument("--minutes", type=float, default=None, help="wall-minutes of training per candidate")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--chunk", type=int, default=25, help="steps a candidate trains per turn")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: data.batch_size)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each candidate left out of images/s")
    parser.add_argument("--fid-samples", type=int, default=2000, help="samples per FID (0: no FID, speed only)")
    parser.add_argument("--fid-batch", type=int, default=250)
    parser.add_argument("--evals", type=int, default=1, help="FIDs at this many evenly spaced points of the budget")
    parser.add_argument("--cache-dir", default="logs/cache", help="the feature classifier and reference statistics")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (initial weights, t and noise draws)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="runs per candidate, seeds --seed, --seed+1, ... (FID early on is chaotic)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every candidate, e.g. trainer.max_steps=...")
    args = parser.parse_args()
    if args.steps is None and args.minutes is None:
        args.steps = 1000
    warnings.filterwarnings("ignore", message=".*`self.trainer` reference is not registered")

    # The plain loop has no Trainer to tell the run's length: a step budget is it; a time budget decays nothing.
    budget = [f"module.lr_decay_steps={args.steps}"] if args.steps else ["module.lr_decay=constant"]
    args.overrides = [*budget, *args.overrides]
    base = compose_config(CANDIDATES["default"], args.overrides)
    batch = args.batch or int(base.data.batch_size)
    data = {k: v for k, v in base.data.items() if k != "_target_"}
    datamodule = ImageDataModule(**data)
    batches = Batches(datamodule, batch, args.seed)
    scores = None
    if args.fid_samples:
        extractor = build_features({"name": "classifier", "cache_dir": args.cache_dir}, data, "cpu")
        reference = reference_stats(data, extractor, split="train", cache_dir=args.cache_dir, max_kid_features=0)
        scores = GenerativeScores(extractor, reference, metrics=("fid",))
    runs = [
        Run(CANDIDATES[name], compose_config(CANDIDATES[name], args.overrides), datamodule, args, seed)
        for seed in range(args.seed, args.seed + args.seeds)
        for name in args.candidates
    ]
    budget = f"{args.steps} steps" if args.minutes is None else f"{args.minutes} wall-minutes"
    print(
        f"# fewstep training efficiency: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"batch {batch}, {budget} each in chunks of {args.chunk}, FID of {args.fid_samples} samples "
        f"(dpmpp_2m karras, 10 NFE, classifier features)",
        flush=True,
    )
    while not all(run.done() for run in runs):
        for run in runs:
            run.train(batches, args.chunk)
            while args.evals and run.progress() >= (len(run.scores) + 1) / args.evals - 1e-9:
                record = run.evaluate(scores)
                print(
                    f"{run.candidate.name} (seed {run.seed}): step {record['step']}, "
                    f"{record['cpu_minutes']:.2f} CPU-min, "
                    f"FID {fmt(record['fid'])}, {fmt(run.images_per_second, 1)} images/s",
                    flush=True,
                )

    header = "| candidate | seed | parameters | steps | CPU-min | wall-min | train images/s | FID |"
    print(f"\n{header}\n" + "|---" * 8 + "|")
    for run in runs:
        fids = " / ".join(fmt(s["fid"]) for s in run.scores) or "-"
        print(
            f"| {run.candidate.name} | {run.seed} | {run.parameters:,} | {run.steps} | {run.cpu / 60:.2f} | "
            f"{run.wall / 60:.2f} | {fmt(run.images_per_second, 1)} | {fids} |"
        )
    if args.seeds > 1 and args.fid_samples:
        print("\n| candidate | FID at each evaluation: mean +- sd over seeds |\n|---|---|")
        for name in args.candidates:
            fids = torch.tensor([[s["fid"] for s in r.scores] for r in runs if r.candidate.name == name])
            cells = " / ".join(f"{m:.1f} +- {d:.1f}" for m, d in zip(fids.mean(0), fids.std(0), strict=True))
            print(f"| {name} | {cells} |")
    speeds: dict[str, list[float]] = {}
    for run in runs:
        if run.images_per_second is not None:
            speeds.setdefault(run.candidate.name, []).append(run.images_per_second)
    speed = {name: sum(v) / len(v) for name, v in speeds.items()}
    ratio = speed["default"] / speed["diffusers"] if speed.get("default") and speed.get("diffusers") else None
    if ratio is not None:
        print(
            f"\ntraining images/s, fp32, batch {batch}, interleaved: fewstep tiny {speed['default']:.1f}, "
            f"diffusers UNet2DModel {speed['diffusers']:.1f}: ratio {ratio:.2f}"
        )
    over_diffusers = {name: s / speed["diffusers"] for name, s in speed.items() if speed.get("diffusers")}
    if over_diffusers:
        cells = ", ".join(f"{name} {r:.2f}" for name, r in over_diffusers.items() if name != "diffusers")
        print(f"training images/s over diffusers UNet2DModel's (fp32, same batch, interleaved): {cells}")
    if args.out:
        record = {
            "device": cpu_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "batch": batch,
            "budget": {"steps": args.steps, "minutes": args.minutes, "chunk": args.chunk},
            "fid": {"samples": args.fid_samples, "sampler": "dpmpp_2m", "nfe": 10, "features": "classifier"},
            "overrides": args.overrides,
            "tiny_over_diffusers_images_per_s": ratio,
            "images_per_s_over_diffusers": over_diffusers,
            "candidates": [
                {
                    "name": run.candidate.name,
                    "seed": run.seed,
                    "parameters": run.parameters,
                    "steps": run.steps,
                    "cpu_minutes": run.cpu / 60,
                    "wall_minutes": run.wall / 60,
                    "images_per_s": run.images_per_second,
                    "scores": run.scores,
                }
                for run in runs
            ],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
