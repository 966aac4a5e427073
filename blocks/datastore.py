"""A datastore: one bucket (and key prefix) on an S3-compatible endpoint, saved as a Prefect Block.

The block is the only place that builds boto3 clients (one cached client per endpoint and
credentials) and the edge where boto3/botocore errors become hcx-images errors.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, Callable, Literal

import boto3
import botocore.loaders
import botocore.session
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from prefect.blocks.core import Block
from pydantic import ConfigDict, Field, SecretStr, field_validator
from s3transfer.subscribers import BaseSubscriber

from blocks.prefect_api import prefect_client
from catalog.model import IntegrityError, NotFound, Refused, StorageError, TransientStorageError, human_size
from catalog.settings import S3_MAX_OBJECT, S3_PARTS, get_settings

Progress = Callable[[int], None]
SERVER_COPY_CONCURRENCY = 10  # part copies at once inside the endpoint, as boto3's own default
MAX_PARTS = S3_PARTS  # S3 allows 10,000 parts per multipart upload; keep a margin

# What the object store (or the way to it) can raise; anything else is a bug and propagates as is.
_S3_ERRORS = (ClientError, BotoCoreError, Boto3Error, OSError)

_TRANSIENT_CODES = {
    "RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}


@dataclass(frozen=True)
class ObjectRef:
    """Where an object lies: a datastore (for its endpoint and credentials), a bucket and a key."""

    datastore: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, datastore: str, uri: str) -> "ObjectRef":
        """The inverse of str(): 's3://bucket/key' in `datastore`."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return cls(datastore=datastore, bucket=bucket, key=key)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str


class _KnownSize(BaseSubscriber):
    """s3transfer subscriber: gives the transfer's size up front (so it never asks the file system,
    which knows none for a device) and reports progress."""

    def __init__(self, size: int, progress: Progress | None):
        self._size = size
        self._progress = progress

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self._size)

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
        if self._progress is not None:
            self._progress(bytes_transferred)


@dataclass(frozen=True)
class _ClientConfig:
    endpoint_url: str
    region: str
    access_key: str
    secret_key: str
    verify_tls: bool


# One loader for every client: botocore's loader caches the service models it reads, and a new
# session brings a new loader, which reads and parses the S3 model again (~85 ms a client).
_MODELS = botocore.loaders.create_loader()


def _session() -> boto3.session.Session:
    session = botocore.session.get_session()
    session.register_component("data_loader", _MODELS)
    return boto3.session.Session(botocore_session=session)


def preload_s3_model() -> None:
    """Read the S3 model into the shared loader now (a fork server does, for the processes it forks).
    Building a client opens no connection."""
    _session().client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                      aws_access_key_id="preload", aws_secret_access_key="preload")


@lru_cache(maxsize=32)
def _cached_client(config: _ClientConfig):
    return _session().client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        verify=config.verify_tls,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # Our tasks retry with backoff themselves; botocore adds a few quick retries below.
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        ),
    )


def storage_error(exc: Exception, what: str) -> StorageError:
    """Turn a boto3/botocore error into ours: transient ones are worth a retry, others are not.
    Messages name the operation and object, never credentials."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return NotFound(f"{what}: not found ({code})")
        if code in ("PreconditionFailed", "412"):
            return IntegrityError(f"{what}: the object changed since it was inspected (ETag mismatch)")
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientStorageError(f"{what}: {code or status} (transient)")
        return StorageError(f"{what}: {code or status}")
    if isinstance(exc, (BotoConnectionError, BotoCoreError, ConnectionError, TimeoutError, OSError)):
        return TransientStorageError(f"{what}: {type(exc).__name__}: {exc}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


class S3Datastore(Block):
    """An image or system datastore on any S3 endpoint (MinIO, AWS S3, Ceph RGW, SeaweedFS)."""

    _block_type_name = "HCX Datastore"
    _block_type_slug = "hcx-datastore"
    _description = "A bucket (and key prefix) on an S3-compatible endpoint where hcx-images keeps disk images."
    model_config = ConfigDict(extra="forbid")

    endpoint_url: str = Field(description="S3 endpoint, e.g. http://127.0.0.1:8333 or https://s3.amazonaws.com")
    bucket: str = Field(description="Bucket holding the images")
    prefix: str = Field(default="", description="Key prefix inside the bucket, e.g. 'prod/'")
    region: str = Field(default="us-east-1")
    access_key: SecretStr
    secret_key: SecretStr
    verify_tls: bool = True
    kind: Literal["image", "system"] = "image"
    limit_bytes: int | None = Field(default=None, description="Capacity limit (None: no limit)")
    staging_bucket: str | None = Field(
        default=None,
        description="Bucket of this datastore's staging area, on the same endpoint. "
        "None: the datastore's own bucket, where uploads are adopted in place.",
    )

    @field_validator("prefix")
    @classmethod
    def _prefix_ends_with_slash(cls, value: str) -> str:
        value = value.strip("/")
        return f"{value}/" if value else ""

    # --- clients -----------------------------------------------------------------------------

    def client(self):
        return _cached_client(_ClientConfig(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key=self.access_key.get_secret_value(),
            secret_key=self.secret_key.get_secret_value(),
            verify_tls=self.verify_tls,
        ))

    @staticmethod
    def check_fits(size: int, what: str) -> None:
        """Refuse an object larger than one S3 multipart upload can hold (before anything is written)."""
        if size > S3_MAX_OBJECT:
            raise Refused(
                f"{what} would be one object of {human_size(size)} ({size} bytes), more than a datastore "
                f"holds ({human_size(S3_MAX_OBJECT)}: S3 takes at most {MAX_PARTS} parts of 5 GiB here): "
                "make it smaller, or use qcow2, which stores only what is written."
            )

    @staticmethod
    def transfer_config(size_hint: int | None = None) -> TransferConfig:
        """Bounded transfers; parts grow for huge objects so they stay under S3's 10,000 parts."""
        s = get_settings()
        part_size = max(s.part_size, -(-(size_hint or 0) // MAX_PARTS))
        config = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=s.max_concurrency,
            max_io_queue=s.queued_parts,
        )
        # s3transfer's bounds on buffered parts (boto3's constructor does not take them).
        config.max_in_memory_upload_chunks = s.queued_parts
        config.max_in_memory_download_chunks = s.queued_parts
        return config

    def same_endpoint(self, other: "S3Datastore") -> bool:
        return (self.endpoint_url.rstrip("/"), self.access_key.get_secret_value()) == (
            other.endpoint_url.rstrip("/"), other.access_key.get_secret_value())

    # --- layout ------------------------------------------------------------------------------

    def ref(self, key: str, bucket: str | None = None) -> ObjectRef:
        return ObjectRef(datastore=self._block_document_name or "", bucket=bucket or self.bucket, key=key)

    def image_ref(self, object_id: str) -> ObjectRef:
        return self.ref(f"{self.prefix}images/{object_id}")

    def vm_disk_ref(self, vm_id: int, image_id: int) -> ObjectRef:
        """Where a VM's copy of a non-persistent image lies (in a system datastore), under the VM's prefix."""
        return self.ref(f"{self.prefix}vms/{vm_id}/disk-{image_id}")

    def snapshot_area(self, image_id: int) -> tuple[str, str]:
        """(bucket, prefix) of an image's snapshots: outside the image and staging areas, so that the
        audits of those never take a snapshot for an orphan."""
        return self.bucket, f"{self.prefix}snapshots/image-{image_id}/"

    def snapshot_ref(self, image_id: int, snapshot_id: str) -> ObjectRef:
        bucket, prefix = self.snapshot_area(image_id)
        return self.ref(f"{prefix}{snapshot_id}", bucket=bucket)

    @property
    def staging_is_own_bucket(self) -> bool:
        return self.staging_bucket in (None, self.bucket)

    def staging_ref(self, upload_id: str) -> ObjectRef:
        """Where an upload is staged. In the datastore's own bucket that is already the image's
        final key, so registering adopts it where it lies and no byte moves twice."""
        if self.staging_is_own_bucket:
            return self.image_ref(upload_id)
        return self.ref(f"{self.prefix}{get_settings().staging_prefix}{upload_id}", bucket=self.staging_bucket)

    def staging_area(self) -> tuple[str, str]:
        """(bucket, prefix) listing every staged upload of this datastore."""
        if self.staging_is_own_bucket:
            return self.bucket, f"{self.prefix}images/"
        return self.staging_bucket, f"{self.prefix}{get_settings().staging_prefix}"

    # --- object operations -------------------------------------------------------------------

    def ensure_buckets(self) -> None:
        for bucket in {self.bucket, self.staging_bucket or self.bucket}:
            try:
                self.client().head_bucket(Bucket=bucket)
            except ClientError:
                try:
                    self.client().create_bucket(Bucket=bucket)
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise storage_error(exc, f"create bucket {bucket}") from None
            except _S3_ERRORS as exc:
                raise storage_error(exc, f"reach bucket {bucket} at {self.endpoint_url}") from None

    def head(self, ref: ObjectRef, *, if_match: str | None = None) -> ObjectInfo:
        args = {"Bucket": ref.bucket, "Key": ref.key}
        if if_match:
            args["IfMatch"] = if_match
        try:
            reply = self.client().head_object(**args)
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"head {ref}") from None
        return ObjectInfo(size=reply["ContentLength"], etag=reply["ETag"])

    def exists(self, ref: ObjectRef) -> bool:
        try:
            self.head(ref)
            return True
        except NotFound:
            return False

    def open_read(self, ref: ObjectRef, *, if_match: str | None = None) -> tuple[BinaryIO, ObjectInfo]:
        """A streaming body (read it in chunks, never whole) and what it is."""
        args = {"Bucket": ref.bucket, "Key": ref.key}
        if if_match:
            args["IfMatch"] = if_match
        try:
            reply = self.client().get_object(**args)
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"read {ref}") from None
        return reply["Body"], ObjectInfo(size=reply["ContentLength"], etag=reply["ETag"])

    def upload(self, fileobj: BinaryIO, ref: ObjectRef, *, size_hint: int | None = None,
               progress: Progress | None = None) -> ObjectInfo:
        """Multipart upload from a file or a stream with bounded memory (see Settings); give the
        size of a stream when known, so a huge one gets parts large enough."""
        try:
            self.client().upload_fileobj(fileobj, ref.bucket, ref.key, Config=self.transfer_config(size_hint),
                                         Callback=progress)
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"upload to {ref}") from None
        return self.head(ref)

    def upload_path(self, path: str, ref: ObjectRef, *, size: int, progress: Progress | None = None) -> ObjectInfo:
        """Multipart upload of the first `size` bytes of a file given by name. s3transfer opens the
        file for each part and reads it only as the part is sent, so no part is held in memory,
        whatever the part size (unlike `upload`, which buffers whole parts of a stream). `path` may
        be a device such as /dev/zero: the size is given, never asked of the file system."""
        self.check_fits(size, f"Upload to {ref}")
        try:
            with create_transfer_manager(self.client(), self.transfer_config(size)) as manager:
                manager.upload(path, ref.bucket, ref.key, subscribers=[_KnownSize(size, progress)]).result()
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"upload to {ref}") from None
        return self.head(ref)

    def server_copy(self, src: ObjectRef, dst: ObjectRef, *, if_match: str, size: int,
                    progress: Progress | None = None) -> ObjectInfo:
        """Copy inside the endpoint (UploadPartCopy past the part size, so past 5 GB too), every
        part pinned to the inspected ETag."""
        config = self.transfer_config(size)
        config.max_concurrency = SERVER_COPY_CONCURRENCY  # no byte passes through here: memory stays flat
        try:
            self.client().copy(
                {"Bucket": src.bucket, "Key": src.key}, dst.bucket, dst.key,
                ExtraArgs={"CopySourceIfMatch": if_match}, Config=config, Callback=progress,
            )
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"copy {src} to {dst}") from None
        return self.head(dst)

    def delete(self, ref: ObjectRef) -> None:
        """Idempotent: deleting what is gone succeeds."""
        try:
            self.client().delete_object(Bucket=ref.bucket, Key=ref.key)
        except _S3_ERRORS as exc:
            error = storage_error(exc, f"delete {ref}")
            if not isinstance(error, NotFound):
                raise error from None

    def list_keys(self, bucket: str, prefix: str) -> list[dict]:
        found: list[dict] = []
        try:
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                found.extend(page.get("Contents", []))
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"list s3://{bucket}/{prefix}") from None
        return found

    # --- one multipart upload, part by part (resumable upload sessions) -----------------------

    def start_multipart(self, ref: ObjectRef) -> str:
        """A new multipart upload to `ref`; its S3 upload id."""
        try:
            return self.client().create_multipart_upload(Bucket=ref.bucket, Key=ref.key)["UploadId"]
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"start an upload to {ref}") from None

    def put_part(self, ref: ObjectRef, multipart_id: str, number: int, data: bytes | bytearray) -> str:
        """Store part `number` (1-based) of the multipart upload, replacing an earlier copy; its ETag.
        The SDK sends a CRC32 of the bytes, which the server checks before it keeps them."""
        try:
            return self.client().upload_part(Bucket=ref.bucket, Key=ref.key, UploadId=multipart_id,
                                              PartNumber=number, Body=data)["ETag"]
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"store part {number} of {ref}") from None

    def finish_multipart(self, ref: ObjectRef, multipart_id: str, etags: list[str]) -> ObjectInfo:
        """Join parts 1..len(etags) into the object."""
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, start=1)]
        try:
            self.client().complete_multipart_upload(Bucket=ref.bucket, Key=ref.key, UploadId=multipart_id,
                                                    MultipartUpload={"Parts": parts})
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"complete the upload to {ref}") from None
        return self.head(ref)

    def open_range(self, ref: ObjectRef, start: int, *, if_match: str) -> BinaryIO:
        """A streaming body of the object's bytes from `start` to its end."""
        try:
            return self.client().get_object(Bucket=ref.bucket, Key=ref.key, Range=f"bytes={start}-",
                                            IfMatch=if_match)["Body"]
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"read {ref} from byte {start}") from None

    def list_multipart_uploads(self, bucket: str, prefix: str) -> list[dict]:
        try:
            reply = self.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
        except _S3_ERRORS as exc:
            raise storage_error(exc, f"list uploads s3://{bucket}/{prefix}") from None
        return reply.get("Uploads", [])

    def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        try:
            self.client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except _S3_ERRORS as exc:
            error = storage_error(exc, f"abort upload of s3://{bucket}/{key}")
            if not isinstance(error, NotFound):
                raise error from None


# What Prefect takes as a block name (lowercase letters, digits, dashes): any other name cannot
# exist, and is refused before it reaches a URL of the Prefect API.
DATASTORE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


# Blocks read in the last LOADED_FOR seconds, by name: loading one is a Prefect API call with a new
# client (about 50 ms, most of it building a TLS context), and an upload asked for its datastore
# once per part (a 1 GiB upload spent 3.9 s of the image API's time there). A changed block is seen
# within LOADED_FOR (at once by the process that saved it: `forget_loaded`).
LOADED_FOR = 10.0
_loaded: dict[str, tuple[float, S3Datastore]] = {}


def forget_loaded(name: str) -> None:
    _loaded.pop(name, None)


def load_datastore(name: str) -> S3Datastore:
    """The datastore named `name`, or a clear refusal listing what exists."""
    if (hit := _loaded.get(name)) is not None and time.monotonic() - hit[0] < LOADED_FOR:
        return hit[1]
    try:
        if not DATASTORE_NAME.fullmatch(name):
            raise ValueError(name)
        store = S3Datastore.load(name, _sync=True)
        _loaded[name] = (time.monotonic(), store)
        return store
    except ValueError:
        raise NotFound(
            f"Datastore {name!r} does not exist: `hcx-image datastore list` shows them, "
            "`hcx-image datastore add` registers one."
        ) from None


def all_datastores() -> dict[str, S3Datastore]:
    """Every registered datastore by name."""
    with prefect_client() as client:
        documents = client.read_block_documents_by_type(S3Datastore.get_block_type_slug())
    return {doc.name: load_datastore(doc.name) for doc in documents}


def service_buckets() -> set[str]:
    """Every bucket a datastore of this service keeps images or staged uploads in."""
    return {bucket for store in all_datastores().values() for bucket in (store.bucket, store.staging_bucket) if bucket}
