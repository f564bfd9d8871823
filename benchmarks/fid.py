"""How long an FID evaluation takes, apart from sampling: feature extraction + statistics for N "samples".

    python benchmarks/fid.py                                  # 2,000 MNIST-5k images, classifier features
    python benchmarks/fid.py --features inception --inception-weights PATH   # the standard FID Inception
    python benchmarks/fid.py --features inception --inception-weights random --n 64   # its speed, offline

The "samples" are real MNIST-5k images (the first N of the datamodule's train split, resized to
--image-size), so no diffusion model runs: the figure is what ``sample.py eval=true`` and the FID
callback add on top of sampling. Reported: the one-time cost of the reference statistics (cached
afterwards; recomputed here in a temporary cache), the feature extraction (batch by batch, as
while sampling), the final statistics (FID's matrix square root, KID's subsets, IS) and, for scale,
the FID of those training images (a floor: they are part of the reference) and of uniform noise.
``--inception-weights random`` times the Inception network with untrained weights: a speed figure
only (its reference is the samples themselves; no FID value is printed). On 2 CPU cores Inception
takes ~80 ms per image: 2,000 samples ~2.7 min, the 4,500 MNIST-5k references ~6 min (once).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from fewstep.metrics import GenerativeScores, InceptionFeatures, build_features, compute_reference, reference_stats
from fewstep.metrics.reference import make_datamodule


def random_inception(path: Path) -> Path:
    """torch-fidelity's Inception with its random initial weights, saved as a state_dict (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    loader, load = tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict
    tfi.load_state_dict_from_url = lambda *args, **kwargs: {}
    tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        tfi.load_state_dict_from_url, tfi.FeatureExtractorInceptionV3.load_state_dict = loader, load
    torch.save(net.state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="number of 'samples' to score (default 2000)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=250, help="images per extractor call (as sample.py)")
    parser.add_argument("--features", default="classifier", choices=("classifier", "inception"))
    parser.add_argument("--inception-weights", default=None, help="weights file, or 'random' (speed only)")
    parser.add_argument("--cache-dir", default="logs/cache", help="where the classifier is cached (paths.cache_dir)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = {"name": "mnist5k", "root": "data", "image_size": args.image_size, "val_fraction": 0.1, "split_seed": 0}
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        random_weights = args.features == "inception" and args.inception_weights == "random"
        if random_weights:
            extractor = InceptionFeatures(random_inception(Path(tmp) / "inception-random.pth")).to(device)
        else:
            config = {"name": args.features, "weights_path": args.inception_weights, "cache_dir": args.cache_dir}
            extractor = build_features(config, data, device)  # trains the classifier once when not cached
        print(
            f"FID evaluation of {args.n} samples: features {extractor.name}, device {device}, "
            f"{torch.get_num_threads()} threads, batches of {args.batch_size}"
        )

        datamodule = make_datamodule(data)
        if args.n > len(datamodule.train_set):
            raise SystemExit(f"--n {args.n} exceeds the {len(datamodule.train_set)} images of the train split")
        start = time.perf_counter()
        if random_weights:  # speed only: a reference of the samples themselves spares a long pass over the data
            reference = compute_reference(Subset(datamodule.train_set, range(args.n)), extractor)
        else:
            reference = reference_stats(data, extractor, cache_dir=tmp, batch_size=args.batch_size)
        print(
            f"  reference statistics ({reference.num} real images, once; cached after): "
            f"{time.perf_counter() - start:.2f} s"
        )

        samples = DataLoader(Subset(datamodule.train_set, range(args.n)), batch_size=args.batch_size)
        batches = [images for images, _ in samples]  # loaded beforehand: data loading is not the metric's cost
        noise = [torch.rand_like(b) * 2 - 1 for b in batches]
        scores = GenerativeScores(extractor, reference)
        for label, source in (
            ("MNIST training images (a floor: part of the reference)", batches),
            ("uniform noise images", noise),
        ):
            scores.reset()
            start = time.perf_counter()
            for images in source:
                scores.update(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            extract = time.perf_counter() - start
            start = time.perf_counter()
            values = scores.compute()
            stats = time.perf_counter() - start
            print(f"  {label}:")
            print(
                f"    feature extraction {extract:.2f} s ({1000 * extract / args.n:.2f} ms / image), "
                f"statistics (FID + KID + IS) {stats:.2f} s, total {extract + stats:.2f} s"
            )
            if not random_weights:
                print(f"    FID {values['fid']:.3f}  KID {values['kid_mean']:.4g}  IS {values['is_mean']:.3f}")


if __name__ == "__main__":
    main()
