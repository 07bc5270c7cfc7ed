"""The folder lock (sagan.folder_lock) as an S3 object, for a folder on S3 or an S3-compatible store.

Created only while absent (PUT with If-None-Match: *), refreshed and removed only while its ETag is still the one
this process wrote (If-Match), and an abandoned one deleted only while it is still the one judged abandoned, so
two processes can never both hold it (S3 conditional writes: https://docs.aws.amazon.com/AmazonS3/latest/userguide/
conditional-requests.html). boto3 finds the store as MLflow does (AWS_ENDPOINT_URL, the standard credentials).
"""

import json


class ObjectLockMixin:
    """Put before a FolderLock subclass in the bases, and call `_use_object` from __init__: the lock's storage
    primitives then act on the object `url` instead of a file."""

    def _use_object(self, url: str) -> None:
        self.path = url
        self.bucket, self.key = url.removeprefix("s3://").split("/", 1)
        self.etag = self.seen = None  # the ETag this process wrote; the one last read
        import boto3  # here: only a folder on S3 needs it
        from botocore.config import Config

        self.client = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))

    def _call(self, method: str, **kwargs) -> dict | None:
        """The S3 call, None when its condition failed (another process got there first); OSError otherwise."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise OSError(f"{method}: {code or e}") from None
        except BotoCoreError as e:
            raise OSError(f"{method}: {e}") from None

    def _put(self, **condition) -> bool:
        body = json.dumps(self._record(self.start)).encode()
        answer = self._call("put_object", Body=body, ContentType="application/json", **condition)
        if answer is not None:
            self.etag = answer["ETag"]
        return answer is not None

    def _prepare(self) -> None:
        self.created_dir = False

    def _create(self) -> bool:
        return self._put(IfNoneMatch="*")

    def _holder(self) -> dict | None:
        answer = self._call("get_object")
        if answer is None:
            return None
        self.seen = answer["ETag"]
        try:
            record = json.loads(answer["Body"].read())
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _take_over(self, stale: dict) -> bool:
        return self.seen is not None and self._call("delete_object", IfMatch=self.seen) is not None

    def _refresh(self) -> None:
        if not self._put(IfMatch=self.etag):
            raise OSError("the lock object changed since this process wrote it")

    def _remove(self) -> None:
        if self.etag:
            self._call("delete_object", IfMatch=self.etag)
