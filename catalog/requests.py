"""What a user asks for: typed request models shared by the CLI, the flows and their deployments."""

from __future__ import annotations

import re
from typing import Annotated, Callable, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from catalog import rules
from catalog.identity import ADMIN_USER, open_directory
from catalog.model import Bus, DiskFormat, Image, ImageType, Operation, Refused, human_size, parse_size
from catalog.permissions import Actor
from catalog.settings import S3_MAX_OBJECT, S3_PARTS, get_settings


def _by_rule(rule: Callable[[str], None]) -> AfterValidator:
    """A field checked by a rule of `catalog.rules`: the request is refused with the rule's words."""

    def check(value: str) -> str:
        try:
            rule(value)
        except Refused as exc:
            raise ValueError(str(exc)) from None
        return value

    return AfterValidator(check)


ImageName = Annotated[str, Field(min_length=1, max_length=rules.MAX_NAME), _by_rule(rules.validate_name)]
Description = Annotated[str, _by_rule(rules.validate_description)]


# A checksum a user got with an image (a distribution's SHA256SUMS, say): checked on the bytes as
# they arrive, whatever the source; a mismatch leaves nothing behind.
DIGEST_LENGTHS = {"sha256": 64, "sha1": 40, "md5": 32}


class Checksum(BaseModel):
    algorithm: Literal["sha256", "sha1", "md5"]
    value: str = Field(pattern="^[0-9a-fA-F]+$", max_length=64, description="hexadecimal")

    @model_validator(mode="after")
    def _length_of_its_algorithm(self) -> "Checksum":
        self.value = self.value.lower()
        if len(self.value) != DIGEST_LENGTHS[self.algorithm]:
            raise ValueError(f"a {self.algorithm} checksum has {DIGEST_LENGTHS[self.algorithm]} hexadecimal digits, "
                             f"this one has {len(self.value)}: copy it whole")
        return self

    def __str__(self) -> str:
        return f"{self.algorithm} {self.value}"


# Sources the service fetches itself. Checked here for their shape (the image API's 422, a deployment's
# parameters); what the fetch may reach is tasks/url_source.py's concern. A URL is never echoed back:
# it may carry a password.
IMPORT_SCHEMES = ("http", "https")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _image_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise ValueError("the image URL is not a valid URL: give an http:// or https:// URL") from None
    if parts.scheme.lower() not in IMPORT_SCHEMES:
        got = f"not {parts.scheme}://" if parts.scheme else "and this one has no scheme"
        raise ValueError(f"images are imported from http:// or https:// URLs only, {got}: give an http(s) URL")
    if "@" in parts.netloc:
        raise ValueError("the image URL carries a user name or password (user:pass@...), which would end up in "
                         "logs: give a URL that needs none (a pre-signed URL, say)")
    if not host:
        raise ValueError("the image URL has no host: give a full URL such as https://host/image.qcow2")
    return value


def _s3_uri(value: str) -> str:
    bucket, slash, key = value.removeprefix("s3://").partition("/")
    if not value.startswith("s3://") or not slash or not key or not S3_BUCKET.fullmatch(bucket):
        raise ValueError("an S3 source is s3://BUCKET/KEY (a bucket name of 3 to 63 lowercase letters, digits, "
                         "dots and dashes, then the object's key)")
    return value


ImageUrl = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_image_url)]
S3Uri = Annotated[str, Field(min_length=1, max_length=1100), AfterValidator(_s3_uri)]


class RequestedBy(BaseModel):
    """Who the operation acts as: set by the image API from the caller's token (or, for an operator
    starting a deployment from the Prefect UI, the administrator). Their groups and rights are read
    from the directory when the operation runs, never taken from the request."""

    # Hidden from the deployments' forms (SkipJsonSchema): set by the image API, never typed by hand.
    owner: SkipJsonSchema[str] = Field(default=ADMIN_USER, description="User the operation acts as")

    def actor(self) -> Actor:
        return open_directory().actor(self.owner)


class UploadRequest(RequestedBy):
    """Register an image from bytes already staged (by the image API or an external tool), or from a
    source the flow reads itself: a file on the worker, an http(s) URL or an S3 object."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a refused URL may carry a password: never echoed

    name: ImageName
    type: ImageType = ImageType.OS
    datastore: str = "default"
    persistent: bool = False
    bus: Bus = Bus.VIRTIO
    driver: DiskFormat | None = Field(default=None, description="raw or qcow2; must match the bytes (None: detected)")
    description: Description = ""
    path: str | None = Field(default=None, description="A file on the worker to stage first (server-side read)")
    url: ImageUrl | None = Field(default=None, description="An http(s) URL to fetch the image from")
    sealed_url: SkipJsonSchema[str | None] = Field(
        default=None, max_length=128,
        description="Set by the image API when `url` had a query (a pre-signed URL's signature): the name under "
                    "which the service keeps the whole URL while it is fetched; `url` is then shown without it",
    )
    s3_uri: S3Uri | None = Field(default=None, description="An S3 object to read the image from: s3://BUCKET/KEY")
    s3_datastore: str | None = Field(
        default=None, max_length=128,
        description="The datastore whose endpoint and credentials read s3_uri; default: `datastore`",
    )
    upload_id: SkipJsonSchema[str | None] = Field(default=None, description="Id of the staged object; default: the flow run id")
    expected_sha256: str | None = Field(default=None, pattern="^[0-9a-f]{64}$")
    checksum: Checksum | None = Field(default=None, description="A published checksum the bytes must have")
    client_path: str | None = Field(
        default=None, description="The local file the CLI staged; `retry` re-stages it if the staged object is gone",
    )
    skip_capacity_check: bool = Field(default=False, description="Administrators only: ignore the datastore's limit")

    @model_validator(mode="after")
    def _one_source(self) -> "UploadRequest":
        given = [name for name in ("path", "url", "s3_uri") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one source of the bytes, not {' and '.join(given)}: path (a file on the worker), "
                             "url or s3_uri")
        if self.s3_datastore is not None and not self.s3_uri:
            raise ValueError("s3_datastore says which datastore's keys read s3_uri: give it with s3_uri only")
        return self

    @property
    def fetched_by_flow(self) -> bool:
        """Whether the flow reads the bytes itself (a file on the worker, a URL, an S3 object): a
        retry reads them again, no client sends them."""
        return bool(self.path or self.url or self.s3_uri)

    @property
    def source_datastore(self) -> str:
        """The datastore whose endpoint and credentials read `s3_uri`."""
        return self.s3_datastore or self.datastore


class CreateRequestFields(RequestedBy):
    """What every request that makes a new image shares."""

    skip_capacity_check: bool = Field(default=False, description="Administrators only: ignore the datastore's limit")
    object_id: SkipJsonSchema[str | None] = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="Id of the new image's object (its key in the datastore); default: the flow run id",
    )


class CloneRequest(CreateRequestFields):
    """Clone an image into a new one (type, format and sha256 inherited, the copy verified)."""

    source_id: int = Field(ge=0, description="Image to clone (USE right needed)")
    name: ImageName = Field(description="Name of the new image")
    datastore: str | None = Field(default=None, description="Datastore of the clone; default: the source's")
    persistent: bool = False
    description: Description | None = Field(default=None, description="Default: the source's description")


class CreateEmptyRequest(CreateRequestFields):
    """An empty OS or DATABLOCK disk of a given size, made with qemu-img."""

    name: ImageName
    type: ImageType = ImageType.DATABLOCK
    size: int = Field(gt=0, description="Virtual size in bytes (a string like '10G' is accepted)")
    datastore: str = "default"
    persistent: bool = False
    bus: Bus = Bus.VIRTIO
    driver: DiskFormat = Field(default=DiskFormat.RAW, description="raw (full size in the datastore) or qcow2")
    description: Description = ""

    @field_validator("size", mode="before")
    @classmethod
    def _size_with_unit(cls, value):
        if isinstance(value, str):
            try:
                return parse_size(value)
            except Refused as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _size_within_limits(self) -> "CreateEmptyRequest":
        try:
            check_empty_size(self.size, self.driver)
        except Refused as exc:
            raise ValueError(str(exc)) from None
        return self


def check_empty_size(size: int, driver: DiskFormat) -> None:
    """Refuse an empty image above Settings.max_virtual_size, or a raw one larger than one datastore
    object can be (it is stored at full size): the CLI before anything starts, the request model
    for any other caller (a deployment's REST API)."""
    limit = get_settings().max_virtual_size
    if size > limit:
        raise Refused(
            f"Size {human_size(size)} ({size} bytes) is above the largest virtual size this service takes "
            f"({human_size(limit)}, HCX_MAX_VIRTUAL_SIZE): ask for a smaller disk, or have an "
            "administrator raise HCX_MAX_VIRTUAL_SIZE."
        )
    if driver is DiskFormat.RAW and size > S3_MAX_OBJECT:
        raise Refused(
            f"A raw image of {human_size(size)} ({size} bytes) is stored at full size, as one object, and "
            f"a datastore object holds at most {human_size(S3_MAX_OBJECT)} (S3 takes {S3_PARTS} parts of "
            "5 GiB here): use --driver qcow2, which stores only what is written, or a smaller size."
        )


class DeleteRequest(RequestedBy):
    """Remove an image's objects from its datastore, then its row."""

    image_id: int = Field(ge=0)
    force: bool = Field(default=False, description="Delete a LOCKED image too (ADMIN right needed)")


class RetryRequest(RequestedBy):
    """Re-run the operation that left an image in ERROR, from where it failed."""

    image_id: int = Field(ge=0)


class VmDisksRequest(RequestedBy):
    """Make (prolog) or let go of (epilog) a VM's disks: those of `image_ids`, or all of them."""

    vm_id: int = Field(ge=0)
    image_ids: list[int] | None = Field(default=None, description="Only these disks (an attach or a detach)")


def rerun_request(image: Image, actor: Actor) -> tuple[Operation, RequestedBy]:
    """What carries on the operation an image was retried into (`rules.retry`): the operation (its
    flow has the same name) and the request it recorded, or for a delete a new one by `actor`."""
    last = image.last_operation
    op = last.op if last is not None else Operation.DELETE
    if op is Operation.DELETE:
        return op, DeleteRequest(owner=actor.user, image_id=image.id)
    if op is Operation.UPLOAD:
        return op, UploadRequest.model_validate({**last.request, "upload_id": last.upload_id})
    model = {Operation.CLONE: CloneRequest, Operation.CREATE_EMPTY: CreateEmptyRequest}[op]
    return op, model.model_validate(last.request)
