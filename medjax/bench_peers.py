"""medjax against its PyTorch peers on this CPU, measured alternately in one run.

    bash ../shared/bench/peers_setup.sh    # once: CPU torch + MONAI into /tmp/medjax-peers
    python -m medjax.bench_peers --rounds=5

U-Net: MONAI BasicUNet(features=(16, 32, 64, 128, 256, 16)) from ../shared/bench/peer_unet.py
against medjax's CRL U-Net (`configs/crl.py`, UNet width=16 depth=4: features 16, 32, 64, 128,
256), one training step on a batch of 8 128x128x1 images, one device, --threads CPUs.
What differs inside the step:
- loss: the peer uses BCE; medjax uses BCE only too with --loss=bce (the default; sets
  config.loss.dice_weight=0), or its training loss Dice + BCE with --loss=dice_bce.
- optimizer: the peer uses Adam; medjax its trainer's step: global-norm clipping, then AdamW
  with a warm-up/cosine schedule (a few element-wise passes over 1.9M parameters).
- network: MONAI uses instance norm, LeakyReLU, biased convolutions and a 32-channel last
  up-sampling; medjax batch norm (running statistics updated), ReLU, bias-free convolutions
  and a 16-channel one. Parameters: 1.948M vs 1.942M.
R(2+1)D-18: torchvision's r2plus1d_18 with EchoNet-Dynamic's one-output head and optimiser
(peer_r2plus1d.py: MSE, SGD lr 1e-4 momentum 0.9 weight decay 1e-4) against medjax's EF
regressor in `configs/echonet.py:paper` (the same network, 31.30M parameters; MSE; SGD with the
same settings), one training step on 2 clips of 32x112x112x3 (medjax repeats its gray frames to
3 channels, as EchoNet feeds its AVIs), --r2plus1d_steps timed steps.

EchoNet input pipeline (`--models=echonet_input`, no PyTorch needed): clips/s of medjax's EF
training loader (`configs/echonet.py:paper`: 32 frames every 2nd at 112 px, pad-12 crop; videos
decoded once at build time, read from ArrayRecord) against the reference loader's work per
clip: open the AVI and decode every frame with OpenCV into a float array (EchoNet-Dynamic's
`loadvideo`), normalise, pick a random start, take the clip, pad and crop (its `Echo`
dataset's `__getitem__`), over the same synthetic videos in the EchoNet layout. Both run in
this process, one worker each, alternately.

Threads: both processes are pinned to the same --threads CPUs (sched_setaffinity). The peer
also calls torch.set_num_threads(--threads); XLA's CPU client sizes its thread pool to the
CPUs the process may run on (XLA_FLAGS has no thread-count flag in this jaxlib).

Memory: XLA's CPU runtime allocates a step's temporary buffers afresh at every execution
(hundreds of MiB for the U-Net, 3 GiB for the R(2+1)D-18 at batch 2): with 4 KiB pages every
page faults on first touch and strided passes miss the TLB. --glibc_tunables=
glibc.malloc.hugetlb=1 (glibc >= 2.35, transparent huge pages in "madvise" mode) makes glibc
use 2 MiB pages instead, for both sides. medjax's entry points choose that themselves where
the system allows (medjax/hugepages.py); here they are kept from it (MEDJAX_HUGE_PAGES=0)
unless --medjax_huge_pages, so that by default both sides run with the same pages.

Each round runs the peer and medjax once each, in alternating order, so drifts in the shared
machine's load hit both alike; each run reports its median step time over --steps after
--warmup (medjax excludes compilation). Reported: per side the median over rounds of the run
medians, and the median of the per-round ratios medjax / peer (< 1: medjax is faster).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from medjax import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MODELS = flags.DEFINE_list(
    "models", ["unet", "r2plus1d", "echonet_input"], "Which comparisons to run."
)
_INPUT_VIDEOS = flags.DEFINE_integer("input_videos", 64, "Synthetic videos for echonet_input.")
_INPUT_CLIPS = flags.DEFINE_integer("input_clips", 64, "Clips timed per echonet_input run.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", os.path.join("data"), "Where echonet_input builds its synthetic dataset."
)
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds (one run of each side each).")
_R21_STEPS = flags.DEFINE_integer("r2plus1d_steps", 3, "Timed R(2+1)D steps per run.")
_R21_BATCH = flags.DEFINE_integer("r2plus1d_batch", 2, "Clips per R(2+1)D step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per run.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per step.")
_SIZE = flags.DEFINE_integer("size", 128, "Image side.")
_THREADS = flags.DEFINE_integer("threads", 2, "CPUs (and torch threads) for both sides.")
_LOSS = flags.DEFINE_enum("loss", "bce", ["bce", "dice_bce"], "medjax's loss (see above).")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "XLA_FLAGS for the medjax runs.")
_GLIBC_TUNABLES = flags.DEFINE_string(
    "glibc_tunables",
    "",
    "GLIBC_TUNABLES for both sides' runs, e.g. glibc.malloc.hugetlb=1 (see the docstring).",
)
_MEDJAX_HUGE_PAGES = flags.DEFINE_bool(
    "medjax_huge_pages",
    False,
    "Let medjax's entry point choose 2 MiB pages itself, as it does for its users "
    "(medjax/hugepages.py); by default its runs get MEDJAX_HUGE_PAGES=0, so that both sides "
    "use the pages --glibc_tunables gives them.",
)
_PEERS_DIR = flags.DEFINE_string(
    "peers_dir", os.path.join(REPO, "..", "shared", "bench"), "Folder of peer_unet.py."
)
_PEERS_PYTHON = flags.DEFINE_string(
    "peers_python", "/tmp/medjax-peers/bin/python", "Python of the peers' venv."
)
_OUT = flags.DEFINE_string(
    "out", os.path.join("runs", "benchmark", "peers.json"), "Where the results are written."
)


def pinned_cpus(threads: int) -> list[int]:
    """The first `threads` CPUs this process may run on (all of them if fewer)."""
    return sorted(os.sched_getaffinity(0))[:threads]


def _medjax_env() -> dict[str, str]:
    """Environment for a medjax.benchmark run (see --xla_flags, --medjax_huge_pages)."""
    env = {"XLA_FLAGS": _XLA_FLAGS.value, "JAX_PLATFORMS": "cpu"}
    if not _MEDJAX_HUGE_PAGES.value:
        env["MEDJAX_HUGE_PAGES"] = "0"
    return env


def _run(command: list[str], cpus: list[int], env: dict | None = None) -> str:
    """Runs `command` pinned to `cpus` from the repo root (with --glibc_tunables, if set);
    returns its stdout."""
    tunables = {"GLIBC_TUNABLES": _GLIBC_TUNABLES.value} if _GLIBC_TUNABLES.value else {}
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **tunables, **(env or {})},
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout


def peer_unet_step_s(cpus: list[int]) -> float:
    """Median step seconds of one run of the MONAI BasicUNet peer."""
    script = os.path.join(_PEERS_DIR.value, "peer_unet.py")
    out = _run(
        [
            _PEERS_PYTHON.value,
            script,
            f"--batch={_BATCH.value}",
            f"--size={_SIZE.value}",
            f"--steps={_STEPS.value}",
            f"--warmup={_WARMUP.value}",
            f"--threads={_THREADS.value}",
        ],
        cpus,
    )
    return float(json.loads(out.strip().splitlines()[-1])["step_s_median"])


def medjax_unet_step_s(cpus: list[int]) -> float:
    """Median step seconds of one run of medjax.benchmark on the CRL U-Net."""
    with tempfile.TemporaryDirectory(prefix="medjax-peers-") as tmp:
        out = os.path.join(tmp, "benchmark.json")
        command = [
            sys.executable,
            "-m",
            "medjax.benchmark",
            "--config=configs/crl.py",
            "--config.model.width=16",
            "--config.model.depth=4",
            f"--config.data.image_size={_SIZE.value}",
            "--devices=1",
            f"--batch_per_device={_BATCH.value}",
            f"--steps={_STEPS.value}",
            f"--warmup={_WARMUP.value}",
            f"--out={out}",
        ]
        if _LOSS.value == "bce":
            command.append("--config.loss.dice_weight=0.0")
        _run(command, cpus, env=_medjax_env())
        with open(out) as f:
            return float(json.load(f)[0]["step_time_median_s"])


def peer_r2plus1d_step_s(cpus: list[int]) -> float:
    """Median step seconds of one run of torchvision's r2plus1d_18 (EchoNet's head, SGD)."""
    script = os.path.join(_PEERS_DIR.value, "peer_r2plus1d.py")
    out = _run(
        [
            _PEERS_PYTHON.value,
            script,
            f"--batch={_R21_BATCH.value}",
            "--frames=32",
            f"--steps={_R21_STEPS.value}",
            "--warmup=1",
            f"--threads={_THREADS.value}",
        ],
        cpus,
    )
    record = json.loads(out.strip().splitlines()[-1])
    return float(record["step_s_median"])


def medjax_r2plus1d_step_s(cpus: list[int]) -> float:
    """Median step seconds of medjax.benchmark on the EchoNet paper's EF regressor."""
    with tempfile.TemporaryDirectory(prefix="medjax-peers-") as tmp:
        out = os.path.join(tmp, "benchmark.json")
        command = [
            sys.executable,
            "-m",
            "medjax.benchmark",
            "--config=configs/echonet.py:paper",
            "--devices=1",
            f"--batch_per_device={_R21_BATCH.value}",
            f"--steps={_R21_STEPS.value}",
            "--warmup=1",
            f"--out={out}",
        ]
        _run(command, cpus, env=_medjax_env())
        with open(out) as f:
            return float(json.load(f)[0]["step_time_median_s"])


def _echonet_input_task():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_echonet_cfg", f"{REPO}/configs/echonet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("paper")
    config.data.data_dir = _DATA_DIR.value
    config.data.synthetic_num = _INPUT_VIDEOS.value
    from medjax import tasks

    task = tasks.get_task(config)
    task.train_stats()  # Builds the data (once) before anything is timed.
    return task


def reference_clip(path: str, rng, mean: float, std: float):
    """One training clip the way EchoNet-Dynamic's loader makes it, from the AVI."""
    import cv2
    import numpy as np

    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    video = np.stack(frames).transpose(3, 0, 1, 2).astype(np.float32)  # (C, F, H, W)
    video = (video - mean) / std
    length, period, pad = 32, 2, 12
    if video.shape[1] < length * period:
        missing = length * period - video.shape[1]
        video = np.concatenate([video, np.zeros((3, missing) + video.shape[2:], np.float32)], 1)
    start = rng.integers(video.shape[1] - (length - 1) * period)
    clip = video[:, start + period * np.arange(length)]
    padded = np.zeros(
        clip.shape[:2] + (clip.shape[2] + 2 * pad, clip.shape[3] + 2 * pad), np.float32
    )
    padded[:, :, pad:-pad, pad:-pad] = clip
    i, j = rng.integers(0, 2 * pad, 2)
    return padded[:, :, i : i + clip.shape[2], j : j + clip.shape[3]]


def peer_echonet_input_s(cpus: list[int]) -> float:
    """Seconds per clip of the reference-style loader (decode the AVI every time)."""
    del cpus  # Runs in this process.
    import numpy as np

    from medjax import data as data_lib

    raw = data_lib.synthetic_raw_dir("echonet_dynamic", _DATA_DIR.value, _INPUT_VIDEOS.value, 0)
    videos = sorted(os.listdir(os.path.join(raw, "Videos")))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for k in range(_INPUT_CLIPS.value):
        path = os.path.join(raw, "Videos", videos[rng.integers(len(videos))])
        reference_clip(path, rng, 30.0, 40.0)
    return (time.perf_counter() - start) / _INPUT_CLIPS.value


def medjax_echonet_input_s(cpus: list[int]) -> float:
    """Seconds per clip of medjax's EF training loader (grain, in this process)."""
    del cpus
    task = _echonet_input_task()
    batch = 8
    batches = max(1, _INPUT_CLIPS.value // batch)
    iterator = iter(task.train_loader(batch, seed=0))
    next(iterator)  # Warm-up: opens the ArrayRecord files.
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / (batches * batch)


COMPARISONS = {
    "unet": (peer_unet_step_s, medjax_unet_step_s),
    "r2plus1d": (peer_r2plus1d_step_s, medjax_r2plus1d_step_s),
    "echonet_input": (peer_echonet_input_s, medjax_echonet_input_s),
}


def compare(name: str, cpus: list[int]) -> dict:
    """Alternating rounds of the peer and medjax; per-round times and the median ratio."""
    peer, medjax = COMPARISONS[name]
    sides = {"peer": peer, "medjax": medjax}
    rounds = []
    print(
        f"{name}: {'round':>5}  {'first':>6}  {'peer s':>8}  {'medjax s':>8}  {'medjax/peer':>11}"
    )
    for r in range(_ROUNDS.value):
        order = ("peer", "medjax") if r % 2 == 0 else ("medjax", "peer")
        times = {side: sides[side](cpus) for side in order}
        ratio = times["medjax"] / times["peer"]
        rounds.append({"first": order[0], **times, "medjax_over_peer": ratio})
        print(
            f"{name}: {r + 1:>5}  {order[0]:>6}  {times['peer']:8.3f}  {times['medjax']:8.3f}  "
            f"{ratio:11.2f}"
        )
    summary = {
        key: statistics.median(r[key] for r in rounds)
        for key in ("peer", "medjax", "medjax_over_peer")
    }
    print(
        f"{name}: {'median':>5}  {'':>6}  {summary['peer']:8.3f}  {summary['medjax']:8.3f}  "
        f"{summary['medjax_over_peer']:11.2f}"
    )
    return {
        "rounds": rounds,
        "median_step_s": {"peer": summary["peer"], "medjax": summary["medjax"]},
        "median_medjax_over_peer": summary["medjax_over_peer"],
        "peer_speedup_factor": 1.0 / summary["medjax_over_peer"],
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not os.path.exists(_PEERS_PYTHON.value):
        raise app.UsageError(
            f"{_PEERS_PYTHON.value} is missing: run `bash ../shared/bench/peers_setup.sh` first."
        )
    unknown = [m for m in _MODELS.value if m not in COMPARISONS]
    if unknown:
        raise app.UsageError(f"Unknown --models {unknown}; known: {', '.join(COMPARISONS)}.")
    cpus = pinned_cpus(_THREADS.value)
    result = {
        "cpus": cpus,
        "threads": _THREADS.value,
        "xla_flags": _XLA_FLAGS.value,
        "glibc_tunables": _GLIBC_TUNABLES.value,
        "medjax_huge_pages": _MEDJAX_HUGE_PAGES.value,
        "rounds": _ROUNDS.value,
    }
    if "unet" in _MODELS.value:
        print(
            f"U-Net, batch {_BATCH.value} of {_SIZE.value}x{_SIZE.value}x1, CPUs {cpus}, "
            f"medjax loss {_LOSS.value}."
        )
        result["unet"] = {
            "peer": "monai.BasicUNet2d(16,32,64,128,256,16), BCE + Adam",
            "medjax": f"UNet(width=16, depth=4), {_LOSS.value} + clipped AdamW",
            "batch": _BATCH.value,
            "size": _SIZE.value,
            "steps": _STEPS.value,
            "warmup": _WARMUP.value,
            **compare("unet", cpus),
        }
    if "r2plus1d" in _MODELS.value:
        print(f"R(2+1)D-18, batch {_R21_BATCH.value} of 32x112x112x3, CPUs {cpus}.")
        result["r2plus1d"] = {
            "peer": "torchvision r2plus1d_18, fc 512->1, MSE + SGD(1e-4, 0.9, wd 1e-4)",
            "medjax": "EFRegressor(depth=18, width=64), MSE + SGD (configs/echonet.py:paper)",
            "batch": _R21_BATCH.value,
            "steps": _R21_STEPS.value,
            **compare("r2plus1d", cpus),
        }
    if "echonet_input" in _MODELS.value:
        print(
            f"EchoNet input, seconds per training clip (32x112x112), {_INPUT_VIDEOS.value} "
            "synthetic videos; medjax/peer < 1: medjax delivers clips faster."
        )
        _echonet_input_task()
        result["echonet_input"] = {
            "peer": "decode the AVI (OpenCV) per clip, normalise, clip, pad-crop (EchoNet's Echo)",
            "medjax": "grain train_loader over ArrayRecord videos decoded at build time",
            "clips": _INPUT_CLIPS.value,
            **compare("echonet_input", cpus),
        }
    writers.write_json(_OUT.value, result)
    print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
