"""Dataset registry, build API and the one command line for all medjax datasets.

Command line::

    python -m medjax.data list
    python -m medjax.data synthesize crl_ultrasound --out RAW --num 300 --seed 0
    python -m medjax.data build crl_ultrasound --manual_dir=RAW --data_dir=OUT
    python -m medjax.data build echonet_dynamic --manual_dir=RAW --data_dir=OUT \
        --skip_missing_videos

Python API (used by the trainer)::

    builder = ensure_built("crl_ultrasound", data_dir=OUT, synthetic_num=300, synthetic_seed=0)
    train = builder.as_data_source("train")   # random access; train[i] is a dict of numpy

Where things go. A dataset built from raw directory RAW is stored, the TFDS way, in
`<data_dir>/<name>/<source key>/<version>/`, where the TFDS BuilderConfig name `<source key>`
is `<RAW's folder name>-<12 hex digits of a SHA-256 over the relative path, size and
modification time of every non-hidden file under RAW>` (a stat, not a read: cheap even for a
many-gigabyte video dataset), followed by `-o<8 hex digits>` of the build options when any
differs from the builder's default. Datasets built from different raw data (say a synthetic one and a
real one) therefore never collide in one data_dir, rebuilding from unchanged raw data is a
no-op, and editing a raw file leads to a fresh build rather than to stale data. Builders cannot
tell synthetic raw data from real raw data; only `ensure_built` synthesizes, into
`<data_dir>/raw/<name>_synthetic_n<num>_s<seed>/`.

Builds never touch the network: no GCS lookups, no downloads; the data comes from the manual
directory only. TFDS writes into a temporary `incomplete.*` folder and renames it when done,
so an interrupted build leaves no half-written dataset behind, only that temporary folder (and
a synthesis cut short leaves a `.incomplete-*` raw folder). A build holds an exclusive lock
(`<data_dir>/<name>/.build.lock`, released by the system even when the process is killed):
two builds of one dataset never run at once, and the temporary folders a build finds while
holding the lock are those of killed builds, which it removes.
"""

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds
from absl import logging
from medjax_datasets import (
    crl_ultrasound,
    ct_ich,
    echonet_dynamic,
    embryo_timelapse,
    sdf_perfusion,
)

FILE_FORMAT = "array_record"


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its TFDS builder, its synthetic generator and a description."""

    builder_class: type[tfds.core.GeneratorBasedBuilder]
    synthesize: Callable[..., None]  # synthesize(out_dir, num, seed)
    description: str
    build_options: tuple[str, ...] = ()  # Keyword arguments its builder class accepts.


DATASETS: dict[str, DatasetEntry] = {
    "crl_ultrasound": DatasetEntry(
        builder_class=crl_ultrasound.CrlUltrasound,
        synthesize=crl_ultrasound.synthesize,
        description="First-trimester ultrasound: fetus mask, crown/rump points, GA, quality.",
    ),
    "ct_ich": DatasetEntry(
        builder_class=ct_ich.CtIch,
        synthesize=ct_ich.synthesize,
        description="Head CT slices (HU): hemorrhage masks, subtype and fracture labels.",
        build_options=("offline_augment_copies",),
    ),
    "echonet_dynamic": DatasetEntry(
        builder_class=echonet_dynamic.EchonetDynamic,
        synthesize=echonet_dynamic.synthesize,
        description="Echocardiogram videos: ejection fraction, EDV/ESV, ED/ES LV masks.",
        build_options=("skip_missing_videos",),
    ),
    "embryo_timelapse": DatasetEntry(
        builder_class=embryo_timelapse.EmbryoTimelapse,
        synthesize=embryo_timelapse.synthesize,
        description="Time-lapse embryo videos: embryo crops, hours, phases, clinical outcome.",
        build_options=embryo_timelapse.BUILD_OPTIONS,
    ),
    "sdf_perfusion": DatasetEntry(
        builder_class=sdf_perfusion.SdfPerfusion,
        synthesize=sdf_perfusion.synthesize,
        description="SDF microcirculation videos: per-quadrant MFI scores, MFI, flow class.",
        build_options=("frame_size", "num_frames", "frame_stride", "skip_missing_videos"),
    ),
}


def _entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise KeyError(f"Unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name]


def source_key(manual_dir: str | os.PathLike) -> str:
    """The BuilderConfig name identifying a raw directory by its name and content."""
    manual_dir = os.path.abspath(manual_dir)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"Raw data directory {manual_dir!r} does not exist.")
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(manual_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(root, file)
            stat = os.stat(path)
            digest.update(
                f"{os.path.relpath(path, manual_dir)}\0{stat.st_size}\0"
                f"{stat.st_mtime_ns}\0".encode()
            )
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", os.path.basename(manual_dir)).strip("_") or "raw"
    return f"{slug}-{digest.hexdigest()[:12]}"


def synthesize(name: str, out_dir: str | os.PathLike, num: int, seed: int) -> None:
    """Writes `num` synthetic examples of dataset `name` in its raw layout into `out_dir`."""
    _entry(name).synthesize(out_dir, num, seed)


def _builder(
    name: str, data_dir: str | os.PathLike, config: str, **options
) -> tfds.core.DatasetBuilder:
    entry = _entry(name)
    unknown = sorted(set(options) - set(entry.build_options))
    if unknown:
        accepted = ", ".join(entry.build_options) or "none"
        raise ValueError(
            f"Dataset {name!r} has no build option {', '.join(unknown)} (it accepts: {accepted})."
        )
    return entry.builder_class(
        data_dir=os.fspath(data_dir),
        config=tfds.core.BuilderConfig(name=config),
        file_format=FILE_FORMAT,
        **options,
    )


def _option_defaults(name: str) -> dict:
    params = inspect.signature(_entry(name).builder_class.__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def build_key(name: str, manual_dir: str | os.PathLike, options: dict) -> str:
    """The BuilderConfig name of a build: the raw directory's `source_key`, plus a digest of
    the build options that differ from the builder's defaults (so builds of the same raw data
    with other options, say another frame size, live side by side)."""
    key = source_key(manual_dir)
    if options:
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
        key += f"-o{digest[:8]}"
    return key


def _set_options(name: str, options: dict) -> dict:
    """The options that differ from the builder's defaults (None means default)."""
    defaults = _option_defaults(name)
    return {k: v for k, v in options.items() if v is not None and defaults.get(k, object()) != v}


@contextlib.contextmanager
def _build_lock(name: str, data_dir: str | os.PathLike) -> Iterator[bool]:
    """Holds the exclusive build lock of dataset `name` in `data_dir` (waiting for it).

    Yields True while held; False where the file system has no locks (then builds are not
    serialised and no temporary folder is removed, as it may belong to a running build).
    """
    root = os.path.join(os.fspath(data_dir), name)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".build.lock"), "a") as lock:
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logging.warning("Waiting for another process building %s (%s).", name, lock.name)
                fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:
            logging.warning(
                "Cannot lock %s (%s): building without a lock; leftover temporary folders of "
                "killed builds are kept.",
                lock.name,
                error,
            )
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(pattern: str) -> None:
    """Removes the temporary folders of killed builds matching the glob `pattern` (call only
    while holding the build lock)."""
    for path in glob.glob(pattern):
        if os.path.isdir(path):
            logging.warning("Removing %s, left by a build that was killed.", path)
            shutil.rmtree(path, ignore_errors=True)


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | os.PathLike) -> None:
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir), try_download_gcs=False
        ),
    )


def build(
    name: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    **options,
) -> tfds.core.DatasetBuilder:
    """Builds dataset `name` from raw `manual_dir` into `data_dir`; returns the prepared builder.

    Idempotent: when this raw data is already built in `data_dir` with these options, only
    loads it (without taking the build lock, so a read-only data_dir can be read). `options`
    are the dataset's build options (`DatasetEntry.build_options`, e.g.
    `skip_missing_videos=True` for video datasets: leave out listed videos whose file is
    missing instead of failing); None or the builder's default leaves an option unset.
    """
    options = _set_options(name, options)
    key = build_key(name, manual_dir, options)
    builder = _builder(name, data_dir, key, **options)
    if builder.is_prepared():
        return builder
    with _build_lock(name, data_dir) as locked:
        # Another process may have finished the build while this one waited for the lock.
        builder = _builder(name, data_dir, key, **options)
        if not builder.is_prepared():
            if locked:
                config_dir = os.path.join(os.fspath(data_dir), name, key)
                _remove_leftovers(os.path.join(glob.escape(config_dir), "incomplete.*"))
            _prepare(builder, manual_dir)
    return builder


def built_configs(name: str, data_dir: str | os.PathLike) -> list[str]:
    """Source keys of the complete builds of dataset `name` in `data_dir`."""
    root = os.path.join(data_dir, name)
    version = str(_entry(name).builder_class.VERSION)
    if not os.path.isdir(root):
        return []
    return sorted(
        config
        for config in os.listdir(root)
        if os.path.isfile(os.path.join(root, config, version, "dataset_info.json"))
    )


def load_builder(
    name: str, data_dir: str | os.PathLike, config: str | None = None
) -> tfds.core.DatasetBuilder:
    """The prepared builder of dataset `name` in `data_dir`.

    `config` (a source key, see module doc) may be left out when `data_dir` holds one build.
    """
    configs = built_configs(name, data_dir)
    if config is None:
        if len(configs) != 1:
            found = f"several ({', '.join(configs)}); pass config=" if configs else "none"
            raise FileNotFoundError(
                f"Expected one build of {name!r} in {os.fspath(data_dir)!r}, found {found}. Build "
                f"with `python -m medjax.data build {name} --manual_dir=RAW --data_dir=...`."
            )
        config = configs[0]
    elif config not in configs:
        raise FileNotFoundError(
            f"No build {config!r} of {name!r} in {os.fspath(data_dir)!r}; found {configs}."
        )
    return _builder(name, data_dir, config)


def synthetic_raw_dir(name: str, data_dir: str | os.PathLike, num: int, seed: int) -> str:
    return os.path.join(data_dir, "raw", f"{name}_synthetic_n{num}_s{seed}")


def ensure_built(
    name: str,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike,
    synthetic_num: int | None = None,
    synthetic_seed: int = 0,
    **options,
) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder, building (and, without `manual_dir`, synthesizing) if needed.

    Without `manual_dir`, `synthetic_num` examples with `synthetic_seed` are synthesized into
    `synthetic_raw_dir(...)` unless already there (written to a temporary folder then renamed,
    so a killed run never leaves a partial raw directory), then built from it with the
    build `options` (see `build`).
    """
    if manual_dir is None:
        if synthetic_num is None:
            raise ValueError("Pass manual_dir (real data) or synthetic_num (synthetic data).")
        manual_dir = synthetic_raw_dir(name, data_dir, synthetic_num, synthetic_seed)
        if not os.path.isdir(manual_dir):
            with _build_lock(name, data_dir) as locked:
                _synthesize_once(name, manual_dir, synthetic_num, synthetic_seed, locked)
    return build(name, manual_dir, data_dir, **options)


def _synthesize_once(name: str, raw_dir: str, num: int, seed: int, locked: bool) -> None:
    """Synthesizes into `raw_dir` unless there, through a temporary folder renamed when done."""
    if os.path.isdir(raw_dir):  # Written by another process while this one waited.
        return
    parent, prefix = os.path.dirname(raw_dir), f".incomplete-{os.path.basename(raw_dir)}-"
    os.makedirs(parent, exist_ok=True)
    if locked:
        _remove_leftovers(os.path.join(glob.escape(parent), glob.escape(prefix) + "*"))
    tmp_dir = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        synthesize(name, tmp_dir, num, seed)
        os.rename(tmp_dir, raw_dir)
    except OSError:
        if not os.path.isdir(raw_dir):  # Not just lost a race to an unlocked process.
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def cached_index(
    builder: tfds.core.DatasetBuilder,
    fields: Callable[[dict], dict],
    *,
    name: str = "index",
    version: int = 1,
) -> dict[str, dict[str, list]]:
    """A small per-split index of a built dataset, read once and cached as JSON beside it.

    Args:
      builder: a prepared builder.
      fields: record -> {field: JSON-able value}, e.g. a label and an id.
      name: the cache's name (`medjax_<name>.json` in the build's folder).
      version: bump when `fields` changes; a cache of another version is rebuilt.

    Returns:
      {split: {field: [value of each record, in record order]}}.
    """
    path = os.path.join(os.fspath(builder.data_path), f"medjax_{name}.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("version") == version:
            return cached["splits"]
    splits = {}
    for split, source in builder.as_data_source().items():
        entry: dict[str, list] = {}
        for i in range(len(source)):
            for key, value in fields(source[i]).items():
                entry.setdefault(key, []).append(value)
        splits[split] = entry
    import jax  # Deferred: the dataset CLI does not need it.

    if jax.process_index() == 0:
        from medjax import writers

        writers.write_json(path, {"version": version, "splits": splits})
    return splits


def _parse_options(items: list[str]) -> dict:
    """["frame_size=64", ...] -> {"frame_size": 64}; values are Python literals or strings."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE, e.g. --option frame_size=64.")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _print_splits(builder: tfds.core.DatasetBuilder) -> None:
    print(f"Built {builder.name} in {builder.data_dir}")
    for split, info in sorted(builder.info.splits.items()):
        print(f"  {split}: {info.num_examples} examples")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medjax.data", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the registered datasets")
    synth = commands.add_parser("synthesize", help="write a synthetic raw dataset")
    synth.add_argument("name", choices=sorted(DATASETS))
    synth.add_argument("--out", required=True, help="new or empty raw data directory")
    synth.add_argument("--num", type=int, required=True, help="number of examples")
    synth.add_argument("--seed", type=int, default=0)
    build_cmd = commands.add_parser("build", help="build a TFDS dataset from a raw directory")
    build_cmd.add_argument("name", choices=sorted(DATASETS))
    build_cmd.add_argument("--manual_dir", required=True, help="raw data directory")
    build_cmd.add_argument("--data_dir", required=True, help="TFDS data directory to build into")
    build_cmd.add_argument(
        "--skip_missing_videos",
        action="store_true",
        help="leave out listed videos whose file is missing instead of failing (video datasets)",
    )
    build_cmd.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a build option of the dataset (see `list`), e.g. --option frame_size=64; repeatable",
    )
    args = parser.parse_args(argv)
    try:
        _run_command(args)
    except (ValueError, OSError) as e:  # The data's or the user's problem: no traceback.
        parser.exit(1, f"{parser.prog} {args.command}: error: {e}\n")


def _run_command(args: argparse.Namespace) -> None:
    if args.command == "list":
        for name, entry in sorted(DATASETS.items()):
            options = f" [build options: {', '.join(entry.build_options)}]"
            print(f"{name}\t{entry.description}{options if entry.build_options else ''}")
    elif args.command == "synthesize":
        synthesize(args.name, args.out, args.num, args.seed)
        print(f"Wrote {args.num} synthetic {args.name} examples to {args.out}")
    else:
        options = _parse_options(args.option)
        if args.skip_missing_videos:
            options["skip_missing_videos"] = True
        _print_splits(build(args.name, args.manual_dir, args.data_dir, **options))


if __name__ == "__main__":
    sys.exit(main())
