"""The loader reading shards from object storage against the same shards on local disk, side by side
(`python benchmarks/loader_speed.py --s3`).

The S3 server is moto's standalone server on 127.0.0.1 (a dev dependency, started here), or a real store when
--s3-url names one (credentials and AWS_ENDPOINT_URL from the environment, as the pipelines read them). Per
configuration, in this order: disk, S3 with each loader process holding its shards in memory, S3 through a
cold data.cache_dir, then a warm one. The request count per shard comes from moto's request log (not
available against a real store).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sagan.data import find_shards, with_cache


def _start_moto(folder: Path):
    """(process, endpoint URL, log file) of a moto S3 server on a free port of 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder / "moto.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
            return proc, f"http://127.0.0.1:{port}", log
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"error: moto's S3 server did not start; see {log}")


def _upload(local_root: Path, url: str) -> None:
    from sagan.folder import Folder

    target = Folder(url)
    for path in sorted(p for p in local_root.rglob("*") if p.is_file()):
        target.upload(path.relative_to(local_root).as_posix(), str(path))


def _requests(log: Path, prefix: str) -> dict[str, int]:
    import re

    found = re.findall(rb'"(?:\x1b\[[0-9;]*m)*(?:GET|HEAD) (/[^ ?"]*)\S* HTTP', log.read_bytes())
    counts: dict[str, int] = {}
    for path in found:
        path = path.decode()
        if path.startswith(prefix) and path.endswith(".tar"):
            counts[path] = counts.get(path, 0) + 1
    return counts


def measure(location: str, args, ours) -> dict:
    """Images/s from disk and from S3 (memory; cold and warm cache), ratios to disk, requests per shard.
    `ours(shards, workers, repeats=None)`: loader_speed's timed runner, its row with the labels it saw."""
    split_dir = Path(location)
    root = split_dir.parent
    with tempfile.TemporaryDirectory() as tmp:
        proc = log = None
        saved_env = {
            k: os.environ.get(k)
            for k in (
                "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION",
                "AWS_EC2_METADATA_DISABLED",
            )
        }
        if args.s3_url:
            url = args.s3_url.rstrip("/")
        else:
            proc, endpoint, log = _start_moto(Path(tmp))
            os.environ.update(
                {
                    "AWS_ENDPOINT_URL": endpoint,
                    "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true",
                }
            )
            import pyarrow.fs as pafs

            host = endpoint.removeprefix("http://")
            pafs.S3FileSystem(endpoint_override=host, scheme="http", allow_bucket_creation=True).create_dir("bench")
            url = "s3://bench/shards"
        try:
            start = time.perf_counter()
            _upload(root, url)
            upload_s = time.perf_counter() - start
            remote = f"{url}/{split_dir.name}"
            rows, requests = {}, {}

            def timed(key: str, shards, workers: int, repeats=None):
                before = _requests(log, "/bench/shards/") if proc else {}
                rows[key] = ours(shards, workers, repeats)
                if proc:
                    time.sleep(0.5)  # the server logs a request after answering it
                    after = _requests(log, "/bench/shards/")
                    per_shard = [after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)]
                    requests[key] = {
                        "shards_fetched": len(per_shard),
                        "requests_per_shard_max": max(per_shard, default=0),
                        "requests_total": sum(per_shard),
                    }

            for workers in (1, 2):
                timed(f"disk_workers_{workers}", find_shards(location), workers)
                timed(f"s3_memory_workers_{workers}", find_shards(remote), workers)
                cache = _Cache(str(Path(tmp) / f"cache-{workers}"))
                timed(f"s3_cold_cache_workers_{workers}", with_cache(find_shards(remote), cache), workers, repeats=1)
                timed(f"s3_warm_cache_workers_{workers}", with_cache(find_shards(remote), cache), workers)
        finally:
            if proc:
                proc.kill()
                proc.wait()
                for key, value in saved_env.items():  # the caller's environment as it was (the server is gone)
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
    shards = find_shards(location)
    result = {
        "store": "a real store at " + url if args.s3_url else "moto's S3 server on 127.0.0.1 (same machine)",
        "upload_s": round(upload_s, 2),
        "rates": rows,
        "ratios_to_disk": {
            k: round(v["images_per_s"] / rows[f"disk_workers_{k[-1]}"]["images_per_s"], 2)
            for k, v in rows.items()
            if not k.startswith("disk")
        },
        "same_batches_as_disk": all(v["labels"] == rows[f"disk_workers_{k[-1]}"]["labels"] for k, v in rows.items()),
        "num_shards": len(shards.urls),
    }
    if requests:
        result["requests"] = requests
        result["requests_note"] = (
            "HEAD + GET per shard fetched, per configuration (all its passes): in memory, each loader process "
            "fetches the shards its batches read; a cold data.cache_dir fetches each shard once for the node; a "
            "warm one none. Counted from moto's request log"
        )
    for row in rows.values():
        row.pop("labels", None)
    return result


class _Cache:
    """The data section's two cache keys, for `with_cache`."""

    def __init__(self, cache_dir: str, cache_gb: float = 100.0):
        self.cache_dir, self.cache_gb = cache_dir, cache_gb
