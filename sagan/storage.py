"""One filesystem layer for local paths and object storage URLs (s3://bucket/prefix, gs://bucket/prefix), on
pyarrow.fs: the same calls reach a local disk, AWS S3, an S3-compatible store (MinIO, Ceph, R2) or GCS.

Credentials come from each store's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, an instance role; GOOGLE_APPLICATION_CREDENTIALS), nothing project-specific.
The one exception pyarrow does not read is the endpoint of an S3-compatible store, AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), which boto3 and MLflow use: it is mapped onto pyarrow here, and only here.
"""

import copyreg
import os
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

from .errors import UserError

SCHEMES = ("s3", "gs", "gcs")


class StorageError(UserError):
    """Object storage that cannot be used as configured (endpoint, credentials, bucket); one line."""


def user_cache() -> Path:
    """This node's own cache folder: $XDG_CACHE_HOME/sagan, else ~/.cache/sagan."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sagan"


def is_url(path: str | os.PathLike | None) -> bool:
    """Whether `path` names object storage (scheme://...) rather than a local or mounted path."""
    return bool(path) and "://" in str(path)


def s3_endpoint() -> tuple[str, str] | None:
    """(host:port, scheme) of the S3-compatible endpoint in AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or None."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None
    parsed = urlparse(url if "://" in url else f"https://{url}")
    return parsed.netloc, parsed.scheme


# Attempts per S3 request that meets a network error, a 5xx or throttling (not a 403 or a 404): the AWS SDK's
# default strategy waits 25 ms * 2^k before retry k, so 12 attempts span about 100 s (pyarrow's default, 3
# attempts, gives up after about 3 s: a store restarting for 8 s failed a run's checkpoint upload).
S3_ATTEMPTS = 12


def _s3_with_retries(options: dict):
    import pyarrow.fs as pafs

    copyreg.pickle(pafs.S3FileSystem, _reduce_s3)  # passed on pickled again (Ray's controller to its workers)
    # a pyarrow that pickles the strategy itself (apache/arrow GH-47348) passes it in `options`: it wins
    return pafs.S3FileSystem(**{"retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_ATTEMPTS), **options})


def _reduce_s3(fs):
    """How an S3FileSystem pickles in a process that made one here: with S3_ATTEMPTS retries. pyarrow's own
    pickling drops the retry strategy (apache/arrow GH-47348), so Ray Train's controller and workers, which
    receive the run's filesystem pickled, would give up on a request after pyarrow's 3 attempts."""
    _, (options,) = fs.__reduce__()
    return _s3_with_retries, (options,)


def filesystem(url: str, timeout: float | None = None):
    """(pyarrow filesystem, path inside it) for a URL or a local path. `timeout`: seconds to connect and per
    request, with no retries (for checks that must answer quickly); default: pyarrow's timeouts, and retries
    for about 100 s (S3_ATTEMPTS)."""
    import pyarrow.fs as pafs  # here: pyarrow loads only where storage is used (benchmarks/import_times.py)

    url = str(url)
    if not is_url(url):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url))
    scheme, rest = url.split("://", 1)
    bounded = {}
    if timeout is not None:
        bounded = {"connect_timeout": timeout, "request_timeout": timeout}
    if scheme == "s3":
        options = dict(bounded)
        endpoint = s3_endpoint()
        if endpoint:
            options["endpoint_override"], options["scheme"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not endpoint:  # AWS itself: the bucket's own region, as pyarrow's from_uri finds it
            try:
                region = pafs.resolve_s3_region(rest.split("/", 1)[0])
            except (OSError, ValueError):
                region = None  # the check that follows names the problem
        if region:
            options["region"] = region
        if timeout is not None:
            options["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        else:  # rides out a store away for about 100 s (a restart, a failover), not pyarrow's default 3 s
            options["retry_strategy"] = pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_ATTEMPTS)
            copyreg.pickle(pafs.S3FileSystem, _reduce_s3)
        return pafs.S3FileSystem(**options), rest.rstrip("/")
    if scheme in ("gs", "gcs"):
        options = {"retry_time_limit": timedelta(seconds=timeout)} if timeout else {}
        return pafs.GcsFileSystem(**options), rest.rstrip("/")
    raise StorageError(f"{url}: {scheme}:// is not a storage this project reads; use s3://, gs:// or a path")


def ray_storage(url: str) -> dict:
    """Ray Train's and Tune's RunConfig storage arguments for `url`: on S3, the filesystem made here (with the
    endpoint of AWS_ENDPOINT_URL, which pyarrow's own URI parsing would not use, and S3_ATTEMPTS retries) and the
    path inside it (Ray takes a custom filesystem with a prefix-stripped path)."""
    if str(url).startswith("s3://"):
        fs, path = filesystem(url)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": url}


def _kind(error: Exception) -> str:
    """What an object-store error means for the user: the endpoint, the credentials, the bucket, or else."""
    text = str(error)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode" in text:
        return "unreachable"
    if any(k in text for k in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED", "403")):
        return "credentials"
    if "NO_SUCH_BUCKET" in text:
        return "bucket"
    return "other"


def check_storage(url: str, setting: str, writable: bool = True, timeout: float = 5.0) -> None:
    """StorageError in one line, within about `timeout` seconds, when `url` cannot be used: the endpoint does
    not answer, the credentials are refused, the bucket does not exist, or (with `writable`) nothing can be
    written under it (a probe object is written and removed). `setting`: the key or flag that named it."""
    if not is_url(url):
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(url, timeout)
    bucket = path.split("/", 1)[0]
    endpoint = s3_endpoint()
    where = f" at {endpoint[1]}://{endpoint[0]}" if endpoint and url.startswith("s3://") else ""
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{setting}={url}: the bucket {bucket} does not exist{where}; create it, or fix the URL")
        if writable:
            probe = f"{path}/.write-test-{uuid.uuid4().hex}"
            with fs.open_output_stream(probe) as f:
                f.write(b"")
            fs.delete_file(probe)
    except StorageError:
        raise
    except OSError as e:
        kind = _kind(e)
        detail = str(e).split("; Details:")[0].split(" (Request ID")[0]
        fix = {
            "unreachable": "start the store, or set AWS_ENDPOINT_URL to one that answers (S3-compatible stores)",
            "credentials": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to keys this store "
            "accepts",
            "bucket": "create the bucket, or fix the URL",
            "other": "check the URL, the credentials and the store",
        }[kind]
        raise StorageError(f"{setting}={url}{where} cannot be used: {detail}; {fix}") from None
