"""An installed (non-editable) fewstep works without the source tree: the top-level API and packaged configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = """
import fewstep, torch
from fewstep import SAMPLERS, DiffusionModel, load_model
from fewstep.config import sampler_config
assert 'target' in fewstep.__file__, fewstep.__file__
assert sampler_config('dpmpp_2m')['spacing'] == 'karras', 'the packaged sampler config was not found'
net = {'_target_': 'fewstep.nn.UNet', 'base_channels': 8, 'channel_mult': [1, 2], 'attention_resolutions': []}
model = DiffusionModel(image_size=16, channels=1, net=net, num_timesteps=100)
images = model.sample(2, 'dpmpp_2m', steps=2, seed=0)
assert images.shape == (2, 1, 16, 16) and 'ddim' in SAMPLERS
print('ok')
"""


@pytest.mark.slow
def test_non_editable_install_uses_packaged_configs(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    # build from a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "fewstep" / "conf" / "sampler" / "dpmpp_2m.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"  # no conf/ here, and the source tree is not on the path
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_folders_do_not_import_upwards():
    """nn/ and samplers/ import nothing of fewstep's higher layers, metrics/ and data/ nothing of lit/."""
    code = (
        "import sys\n"
        "import fewstep.nn, fewstep.samplers\n"
        "assert not [m for m in sys.modules if m.startswith(('fewstep.lit', 'fewstep.diffusion', 'fewstep.metrics'))]\n"
        "import fewstep.metrics, fewstep.metrics.classifier, fewstep.metrics.reference, fewstep.data\n"
        "assert not [m for m in sys.modules if m.startswith('fewstep.lit')], 'metrics/ or data/ imported lit/'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
