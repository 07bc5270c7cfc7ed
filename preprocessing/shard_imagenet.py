"""Shard an ImageNet copy into 128x128 WebDataset tars for SAGAN training.

    python preprocessing/shard_imagenet.py --src /data/imagenet --out /data/imagenet128
    ray job submit --working-dir . -- python preprocessing/shard_imagenet.py --backend ray --src ... --out /shared/...
    python preprocessing/shard_imagenet.py --out /data/imagenet128 --verify     # check existing shards
    python preprocessing/shard_imagenet.py --src /data/imagenet --out s3://bucket/imagenet128  # object storage
    python preprocessing/shard_imagenet.py --src s3://bucket/imagenet --out s3://bucket/imagenet128

Writes OUT/{train,val}/imagenet128-<split>-NNNNNN.tar (per sample: <key>.jpg, <key>.cls, <key>.json),
OUT/classes.tsv, OUT/failures.jsonl and OUT/manifest.json. Re-running skips shards that are complete;
an interrupted run never leaves a partial shard under its final name (on object storage, a shard is built on
local disk, uploaded under a temporary key and copied to its final key when complete).
"""

import argparse
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import PIL
import webdataset
from tqdm import tqdm

from preprocessing.output import TEMP_PATTERN, Output
from preprocessing.shards import RESIZE_FILTERS, ImageOptions, verify_split, write_shard
from preprocessing.sources import SourceError, detect_source, list_samples, plan_hash, plan_shards
from sagan.errors import JobFailed, UsageError, command
from sagan.folder_lock import FolderLock, describe
from sagan.object_lock import ObjectLockMixin
from sagan.storage import check_storage, is_url

MANIFEST_FORMAT = "sagan-webdataset-shards"
LOCK_FILE = ".shard_imagenet.lock"  # held while a run writes the folder
# Options that change what the shards hold: a changed one needs --overwrite.
CONTENT_OPTIONS = ("size", "resize_filter", "quality", "shard_size", "seed", "limit", "prefix")
FIXED_OPTIONS = {"orientation": "exif"}  # how images are decoded: shards made otherwise (before it) are not mixed in


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="shard_imagenet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--src",
        help="ImageNet root: SRC/train/<wnid>/*.JPEG, or the Kaggle layout SRC/ILSVRC/Data/CLS-LOC; a folder, or "
        "object storage (s3://bucket/prefix: read with a listing per folder and a request per image)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder, or object storage: s3://bucket/prefix (AWS_ENDPOINT_URL for S3-compatible stores), "
        "gs://bucket/prefix; a folder every node sees with --backend ray",
    )
    p.add_argument(
        "--splits", default=None, help="comma-separated splits to write (default: train,val, those that exist)"
    )
    p.add_argument("--size", type=int, default=128, help="output side in pixels (default 128)")
    p.add_argument(
        "--resize-filter",
        default="bicubic",
        choices=sorted(RESIZE_FILTERS),
        help="antialiased resize filter (default bicubic)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95, 4:4:4 chroma)")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation that mixes classes across shards")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per split, for trial runs")
    p.add_argument("--prefix", default=None, help="shard name prefix (default imagenet<size>)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes with --backend local (default: all cores)"
    )
    p.add_argument(
        "--backend", default="local", choices=["local", "ray"], help="local process pool, or Ray tasks across a cluster"
    )
    p.add_argument(
        "--max-failures", type=int, default=0, help="unreadable images tolerated before the run fails (default 0)"
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild every shard, also when options changed")
    p.add_argument(
        "--verify", action="store_true", help="re-read every shard and check it against the manifest (alone: no --src)"
    )
    args = p.parse_args(argv)
    for name in ("size", "shard_size", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {args.quality}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures must be 0 or more, got {args.max_failures}")
    if args.src is None and not args.verify:
        raise UsageError("--src is required (or use --verify alone to check an existing --out)")
    if args.src is not None and is_url(args.src) == is_url(args.out):
        src, out = (
            (args.src.rstrip("/"), args.out.rstrip("/"))
            if is_url(args.src)
            else (Path(args.src).expanduser().resolve(), Path(args.out).expanduser().resolve())
        )
        if out == src or (f"{out}".startswith(f"{src}/") if is_url(args.src) else src in out.parents):
            raise UsageError(
                f"--out {args.out} is inside --src {args.src}: a rerun would read the shards as a class of images; "
                "choose an --out outside the source folder"
            )
    if not is_url(args.out) and Path(args.out).expanduser().exists() and not Path(args.out).expanduser().is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder (it will hold train/, val/ and manifest.json)")
    args.prefix = args.prefix or f"imagenet{args.size}"
    return args


def write_json(out: Output, name: str, obj) -> None:
    out.write_text(name, json.dumps(obj, indent=1) + "\n")


def load_manifest(out: Output) -> dict | None:
    path, text = out.url("manifest.json"), out.read_text("manifest.json")
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError(f"{path} is not valid JSON; remove it or pass --overwrite") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise UsageError(f"{path} was not written by shard_imagenet.py; choose another --out")
    return manifest


def run_tasks(tasks: list[tuple[str, list, ImageOptions]], backend: str, workers: int):
    """Yield each task's shard record as it completes, from a local process pool or Ray tasks."""
    if not tasks:
        return
    if backend == "ray":
        import ray  # lazy: only --backend ray needs Ray (seconds to import; benchmarks/import_times.py)

        if not ray.is_initialized():
            ray.init()  # joins the cluster when submitted as a job (RAY_ADDRESS), else starts a local one
        remote = ray.remote(num_cpus=1)(write_shard)
        pending = [remote.remote(*t) for t in tasks]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            for ref in pending:  # after an error: do not keep writing shards nobody will record
                ray.cancel(ref)
        return
    if workers == 1 or len(tasks) == 1:
        for t in tasks:
            yield write_shard(*t)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)), initializer=exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(write_shard, *t) for t in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error: stop queued shards at once


def exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker soon after its parent dies. A killed parent (kill -9, OOM) cannot
    stop its pool, whose workers would otherwise write shards nobody records and then wait forever."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def shard_pattern(prefix: str, split: str, n: int) -> str:
    if n == 0:
        return ""
    return f"{prefix}-{split}-{{{0:06d}..{n - 1:06d}}}.tar"


def build(args) -> dict:
    """Plan, write (or skip) every shard, and write the manifest, classes.tsv and failures.jsonl."""
    out = Output(args.out)
    try:
        source = detect_source(args.src)
    except SourceError as e:
        raise UsageError(str(e)) from None
    splits = args.splits.split(",") if args.splits else list(source.split_dirs)
    missing = [s for s in splits if s not in source.split_dirs]
    if missing:
        raise UsageError(f"split(s) {missing} not found under {source.root}; available: {sorted(source.split_dirs)}")
    if not out.remote:
        try:
            out.check_writable()
        except OSError as e:
            raise UsageError(f"--out {out.name} is not writable: {e.strerror or e}") from None
    options = {**{k: getattr(args, k) for k in CONTENT_OPTIONS}, **FIXED_OPTIONS}
    old = load_manifest(out)
    if old and not args.overwrite:
        changed = sorted(k for k in options if old["options"].get(k) != options[k])
        if changed:
            diff = ", ".join(f"{k}: {old['options'].get(k)} -> {options[k]}" for k in changed)
            raise UsageError(
                f"{out} holds shards made with other options ({diff}); pass --overwrite or choose another --out"
            )

    opts = ImageOptions(args.size, args.resize_filter, args.quality)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": 1,
        "complete": False,
        "options": options,
        "source": {"path": str(source.root), "layout": source.layout},
        "versions": {
            "python": platform.python_version(),
            "pillow": PIL.__version__,
            "webdataset": getattr(webdataset, "__version__", "unknown"),
            "numpy": np.__version__,
        },
        "num_classes": len(source.wnids),
        "splits": {},
    }
    if old and not args.overwrite:  # splits this run does not touch stay as they were
        manifest["splits"] = {k: v for k, v in old["splits"].items() if k not in splits}
    tasks, skipped = [], 0
    for split in splits:
        try:
            samples = list_samples(source, split)
        except SourceError as e:
            raise UsageError(str(e)) from None
        plan = plan_shards(samples, args.shard_size, args.seed, args.limit)
        out.make_folder(split)
        for stale in out.files(split, TEMP_PATTERN):  # left by an interrupted run
            out.remove(split, stale)
        old_records = (
            {}
            if (args.overwrite or not old)
            else {r["name"]: r for r in old["splits"].get(split, {}).get("shards", []) if "sha256" in r}
        )
        records, existing = [], out.files(split, f"{args.prefix}-{split}-*.tar")
        for i, shard in enumerate(plan):
            name = f"{args.prefix}-{split}-{i:06d}.tar"
            record, prev = {"name": name, "plan_hash": plan_hash(shard)}, old_records.get(name)
            if prev and prev["plan_hash"] == record["plan_hash"] and existing.get(name) == prev["bytes"]:
                record = prev
                skipped += 1
            else:
                tasks.append((split, i, (out.url(split, name), shard, opts)))
            records.append(record)
        wanted = {r["name"] for r in records}
        for extra in existing:  # from an earlier, larger plan
            if extra not in wanted:
                out.remove(split, extra)
        manifest["splits"][split] = {"pattern": shard_pattern(args.prefix, split, len(plan)), "shards": records}
    write_json(out, "manifest.json", manifest)
    names = "".join(f"{i}\t{w}\t{source.names.get(w, '')}\n" for i, w in enumerate(source.wnids))
    out.write_text("classes.tsv", names)

    total = sum(len(t[2][1]) for t in tasks)
    print(
        f"{source.layout} layout at {source.root}: {len(source.wnids)} classes; "
        f"{len(tasks)} shard(s) to write ({total} images), {skipped} complete already",
        flush=True,
    )
    start = time.time()
    slots = {t[2][0].rsplit("/", 1)[1]: (t[0], t[1]) for t in tasks}  # shard name -> (split, index)
    with tqdm(total=total, unit="img", desc="sharding", dynamic_ncols=True, mininterval=1.0, disable=not tasks) as bar:
        for record in run_tasks([t[2] for t in tasks], args.backend, args.workers):
            split, index = slots[record["name"]]
            shards = manifest["splits"][split]["shards"]
            shards[index] = {**record, "plan_hash": shards[index]["plan_hash"]}
            write_json(out, "manifest.json", manifest)  # progress survives an interruption
            bar.update(record["planned"])
            bar.set_postfix(img_s=f"{bar.n / max(time.time() - start, 1e-9):.0f}")
    elapsed = time.time() - start

    failures = []
    for entry in manifest["splits"].values():
        counts: dict[str, int] = {}
        for r in entry["shards"]:
            failures.extend(r["failures"])
            for label, n in r["class_counts"].items():
                counts[label] = counts.get(label, 0) + n
        entry["num_samples"] = sum(r["num_samples"] for r in entry["shards"])
        entry["class_counts"] = dict(sorted(counts.items(), key=lambda kv: int(kv[0])))
    out.write_text("failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    # Over the failure budget the shards stay on disk (a re-run with a higher --max-failures reuses them),
    # but the manifest does not call them complete, so training refuses them.
    manifest["complete"] = len(failures) <= args.max_failures
    write_json(out, "manifest.json", manifest)

    counts = ", ".join(f"{s} {e['num_samples']} in {len(e['shards'])} shards" for s, e in manifest["splits"].items())
    rate = total / elapsed if elapsed > 0 else 0.0
    print(f"done: {counts}; {len(failures)} failure(s); {elapsed:.1f}s, {rate:.0f} images/s -> {out.name}")
    if len(failures) > args.max_failures:
        first = failures[0]
        raise JobFailed(
            f"{len(failures)} unreadable image(s), more than --max-failures {args.max_failures} "
            f"(first: {first['path']}: {first['reason']}); see {out.url('failures.jsonl')}"
        )
    return manifest


def verify(out: Output) -> int:
    """Re-read every shard under `out`; print problems; return how many there were."""
    manifest = load_manifest(out)
    if manifest is None:
        raise UsageError(f"{out.url('manifest.json')} not found: nothing to verify")
    classes = out.read_text("classes.tsv")
    if classes is None:
        raise UsageError(f"{out.url('classes.tsv')} not found: re-run the sharding to complete {out.name}")
    wnids = [line.split("\t")[1] for line in classes.splitlines()]
    problems = (
        []
        if manifest["complete"]
        else [f"{out.name}: the manifest is not complete (interrupted or over --max-failures)"]
    )
    for split, entry in manifest["splits"].items():
        found = verify_split(out, split, entry, wnids, manifest["options"]["size"])
        print(
            f"verify {split}: {len(entry['shards'])} shards, {entry.get('num_samples', '?')} samples, "
            f"{len(found)} problem(s)"
        )
        problems.extend(found)
    for line in problems[:20]:
        print(f"  {line}")
    return len(problems)


class ShardFolderLock(FolderLock):
    """The lock on --out while shards are written: a second run on the same folder is refused in one line."""

    def __init__(self, out: Path | str):
        super().__init__(out, f"--out {out}", lock_file=LOCK_FILE)
        self.out = str(out)  # as given: a URL stays one

    def busy(self, holder: dict) -> str:
        return (
            f"--out {self.out} is being written by another shard_imagenet.py ({describe(holder)}); wait for it "
            f"to finish (or end pid {holder.get('pid')} on {holder.get('host')}), or choose another --out"
        )

    def unwritable(self, error: OSError) -> str:
        return f"--out {self.out} is not writable: {error.strerror or error}"


class ShardObjectLock(ObjectLockMixin, ShardFolderLock):
    """The lock on an --out on S3: an object written with conditional requests (sagan.object_lock)."""

    def __init__(self, out: str):
        super().__init__(out)
        self._use_object(f"{out}/{LOCK_FILE}")


@contextmanager
def output_lock(out: Output):
    """One live run per output folder, on a disk or on S3; other object stores cannot be locked (a warning)."""
    if not out.remote:
        with ShardFolderLock(Path(out.root)):
            yield
    elif out.name.startswith("s3://"):
        with ShardObjectLock(out.name):
            yield
    else:
        print(f"warning: {out.name} cannot be locked: make sure no other run writes it", file=sys.stderr)
        yield


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.src is not None:
        out = Output(args.out)
        # the endpoint, credentials and bucket, in one line within seconds, before the lock and the listing
        check_storage(args.src, "--src", writable=False)
        if out.remote:
            out.check_writable()
        with output_lock(out):  # on a disk, the lock makes --out (and removes it again if it is refused)
            build(args)
    if args.verify and verify(Output(args.out)):
        raise JobFailed("verification failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
