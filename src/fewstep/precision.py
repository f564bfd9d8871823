"""``trainer.precision=auto``: the faster of fp32 and bf16 autocast on this machine, decided once.

The rule (:func:`resolve_precision`):

* CUDA: ``bf16-mixed`` on GPUs with native bf16 (compute capability >= 8.0, Ampere and later: their
  tensor cores run bf16 at twice the TF32 rate, and bf16 halves the activation memory and traffic;
  no probe is run there); on older GPUs that only emulate bf16 a probe decides; else ``32``.
* CPU: ``bf16-mixed`` only when the CPU has native bf16 instructions (:func:`native_bf16`: the
  ``avx512_bf16`` or ``amx_bf16`` flag of Linux's /proc/cpuinfo; other systems count as without)
  AND a probe shows bf16 autocast at least ``MARGIN`` (10%) faster than fp32 for the configured
  network; else ``32``. Without native bf16 no probe is run: emulated bf16 is slower.
* anything else (MPS, TPU, ...): ``32``.

The probe (:func:`probe_speedup`) times a few forward+backward passes of a copy of the configured
network on a small batch of the real image shape, fp32 and low precision interleaved (so machine
noise hits both alike), and returns the ratio of the medians: fp32 time / low-precision time.
Its verdict is cached in ``$FEWSTEP_CACHE_DIR/precision.json`` (default ``~/.cache/fewstep``),
keyed by the device name, the torch version and the network config + data shape, so it runs once
per machine and network; a corrupted file is ignored with a warning and rewritten (atomically:
a temporary file renamed over it).

An explicit ``bf16-mixed`` / ``bf16-true`` / ``16-mixed`` / ``16-true`` on a CPU without native
support for that type is honoured, with one warning that gives the measured slowdown.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
AUTO = "auto"
MARGIN = 1.10  # bf16 must be at least 10% faster than fp32 for auto to choose it on a CPU
CACHE_FILE = "precision.json"
CACHE_VERSION = 1
# Requested precisions that compute in a 16-bit type, with that type.
LOW_PRECISION = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
}
CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
Probe = Callable[[torch.dtype], float]


# ---------------------------------------------------------------------------------------- device
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty elsewhere or when unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); ``False`` off Linux."""
    return bool(cpu_flags(cpuinfo) & set(CPU_FLAGS[torch.bfloat16]))


def native_cpu(dtype: torch.dtype, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes ``dtype`` (bfloat16 / float16) natively."""
    return bool(cpu_flags(cpuinfo) & set(CPU_FLAGS.get(dtype, ())))


def cpu_name() -> str:
    """The CPU model name (/proc/cpuinfo's ``model name``, else the platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_kind(accelerator: Any) -> str:
    """``cuda``, ``cpu`` or ``other`` for a Trainer ``accelerator`` (``auto`` as Lightning picks it, but MPS/TPU
    count as other)."""
    name = str(getattr(accelerator, "__name__", accelerator)).lower()
    if name in ("auto", "gpu", "cuda"):
        if torch.cuda.is_available():
            return "cuda"
        if name == "auto" and not (torch.backends.mps.is_available()):
            return "cpu"
        return "other"
    return "cpu" if name == "cpu" else "other"


def cuda_bf16() -> str:
    """``native`` (compute capability >= 8.0), ``emulated`` (bf16 runs, without bf16 tensor cores) or ``none``."""
    if torch.cuda.get_device_capability() >= (8, 0):
        return "native"
    return "emulated" if torch.cuda.is_bf16_supported() else "none"


def device_name(kind: str) -> str:
    return torch.cuda.get_device_name() if kind == "cuda" else cpu_name()


# ----------------------------------------------------------------------------------------- cache
def cache_path(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("FEWSTEP_CACHE_DIR") or Path.home() / ".cache" / "fewstep"
    return Path(root).expanduser() / CACHE_FILE


def cache_key(kind: str, dtype: torch.dtype, network: Any) -> tuple[str, dict[str, Any]]:
    """The cache entry's key (a digest) and what it digests: device, torch version, type, network."""
    what = {
        "device": f"{kind}:{device_name(kind)}",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "network": network,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return digest, what


def read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; ``{}`` when absent; a warning (and ``{}``: it will be rewritten) when corrupted."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data["entries"], dict)):
            raise ValueError("not a fewstep precision cache")
        return data["entries"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the corrupted precision cache %s (%s); measuring again and rewriting it", path, err)
        return {}


def write_cache(path: Path, entries: Mapping[str, Any]) -> None:
    """Write the entries atomically (a temporary file beside it, renamed over it); a failure only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": CACHE_VERSION, "entries": dict(entries)}, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("cannot write the precision cache %s (%s); the probe will run again next time", path, err)


def measured_speedup(
    kind: str, dtype: torch.dtype, probe_fn: Probe, cache_dir: str | Path | None, network: Any
) -> tuple[float | None, bool]:
    """(fp32 time / ``dtype`` time, from the cache?) for this device and network: cached, else probed and
    cached. ``None`` when the probe failed (it is not cached then)."""
    path = cache_path(cache_dir)
    key, what = cache_key(kind, dtype, network)
    entries = read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("speedup"), int | float):
        return float(entry["speedup"]), True
    try:
        speedup = float(probe_fn(dtype))
    except Exception as err:  # a type or op the device does not support: no verdict, fp32 stays safe
        log.warning("could not time %s on %s (%s: %s)", what["dtype"], what["device"], type(err).__name__, err)
        return None, False
    entries = {**read_cache(path), key: {**what, "speedup": speedup, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}}
    write_cache(path, entries)
    return speedup, False


# ------------------------------------------------------------------------------------------ rule
def resolve_precision(
    requested: Any,
    accelerator: Any,
    probe_fn: Probe,
    cache_dir: str | Path | None = None,
    *,
    network: Any = None,
    support: str | None = None,
) -> str:
    """The Trainer ``precision`` to use for ``requested`` (``auto`` or any Lightning precision).

    ``auto`` follows the rule of this module's docstring; any other request is returned as given
    (as a string), with one warning when it is a 16-bit type the CPU lacks natively and the probe
    measures it slower. ``probe_fn(dtype)`` returns fp32 time / ``dtype`` time (see
    :func:`probe_speedup`); ``network`` identifies the network in the cache key; ``support``
    overrides the detected bf16 support of the device (``native`` / ``emulated`` / ``none``; tests).
    """
    requested = str(requested)
    kind = device_kind(accelerator)
    if requested != AUTO:
        dtype = LOW_PRECISION.get(requested)
        if kind == "cpu" and dtype is not None:
            native = (support == "native") if support is not None else native_cpu(dtype)
            if not native:
                warn_emulated(requested, dtype, probe_fn, cache_dir, network)
        return requested
    if kind == "other":
        log.info("precision=auto -> 32 (bf16 is only considered on CUDA and CPUs)")
        return "32"
    name = device_name(kind)
    if support is None:
        support = cuda_bf16() if kind == "cuda" else ("native" if native_bf16() else "none")
    if support == "none":
        why = "no avx512_bf16 / amx_bf16 flag" if kind == "cpu" else "torch.cuda.is_bf16_supported() is False"
        log.info("precision=auto -> 32: %s has no native bf16 (%s)", name, why)
        return "32"
    if kind == "cuda" and support == "native":
        log.info("precision=auto -> bf16-mixed: %s has native bf16 (compute capability >= 8.0; not measured)", name)
        return "bf16-mixed"
    speedup, cached = measured_speedup(kind, torch.bfloat16, probe_fn, cache_dir, network)
    threshold = MARGIN if kind == "cpu" else 1.0
    choice = "bf16-mixed" if speedup is not None and speedup >= threshold else "32"
    figure = "could not be measured" if speedup is None else f"{speedup:.2f}x the speed of fp32"
    log.info(
        "precision=auto -> %s: bf16 autocast %s for this network on %s (%s; bf16 needs >= %.2fx)",
        choice,
        figure,
        name,
        f"cached in {cache_path(cache_dir)}" if cached else "measured once, now cached",
        threshold,
    )
    return choice


def warn_emulated(requested: str, dtype: torch.dtype, probe_fn: Probe, cache_dir: Any, network: Any) -> None:
    """One warning for a 16-bit precision asked on a CPU that lacks it natively, with the measured slowdown."""
    speedup, _ = measured_speedup("cpu", dtype, probe_fn, cache_dir, network)
    flags = " / ".join(CPU_FLAGS[dtype])
    if speedup is None:
        log.warning(
            "trainer.precision=%s on a CPU without native %s (no %s flag): its speed could not be measured; "
            "kept as asked (trainer.precision=auto picks the faster)",
            requested,
            str(dtype).removeprefix("torch."),
            flags,
        )
    elif speedup < 1:
        log.warning(
            "trainer.precision=%s on a CPU without native %s (no %s flag): measured %.2fx slower than fp32 for this "
            "network; kept as asked (trainer.precision=auto or 32 trains faster here)",
            requested,
            str(dtype).removeprefix("torch."),
            flags,
            1 / speedup,
        )
    else:
        log.info("trainer.precision=%s: measured %.2fx the speed of fp32 on this CPU", requested, speedup)


# ----------------------------------------------------------------------------------------- probe
def probe_speedup(
    model: Any,
    dtype: torch.dtype = torch.bfloat16,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    repeats: int = 3,
) -> float:
    """fp32 time / ``dtype``-autocast time of a training step (forward, loss, backward) of a copy of
    ``model.net`` (a :class:`~fewstep.lit.DiffusionModel`) on ``batch_size`` images of its shape.

    One warm-up step of each, then ``repeats`` interleaved pairs; the ratio of the medians. The copy,
    the null conditions and a forked RNG leave the model and the random streams of training untouched.
    """
    device = torch.device(device)
    hp = model.hparams
    shape = (batch_size, hp.channels, hp.image_size, hp.image_size)
    with torch.no_grad():
        cond = {k: v.to(device) for k, v in model.condition(batch_size, use_ema=False).items()}
    net = copy.deepcopy(model.net).to(device).train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x0 = torch.rand(shape, device=device) * 2 - 1

        def step(low: bool) -> float:
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=low):
                loss = model.parameterisation.loss(net, x0, cond)
            loss.backward()
            net.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - start

        step(False), step(True)  # warm-up: kernel selection, allocator
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(repeats):
            for low in (False, True):
                times[low].append(step(low))
    return statistics.median(times[False]) / statistics.median(times[True])
