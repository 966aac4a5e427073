"""Quotas per user and per group: how many images and how many bytes, on one datastore or on all
of them together. Administrators set them (`set_quota`); anyone may read a report (`quota_report`).

The check itself is `rules.check_quota`, made by the store for every new image (upload,
create-empty, clone) and every image changing hands (chown, chgrp) while it holds the subject's
accounting row, so concurrent creations never overrun a quota; `Catalog.check_quota` is the same
check made early, before bytes move. An image counts while its row exists (a DELETE row until its
objects are gone), by its `size`.
"""

from __future__ import annotations

from catalog.identity import Directory
from catalog.model import NotFound, Quota, QuotaSubject, QuotaUsage, Refused, SubjectKind
from catalog.store import Catalog


def set_quota(catalog: Catalog, directory: Directory, subject: QuotaSubject, *, datastore: str | None = None,
              max_images: int | None = None, max_bytes: int | None = None) -> Quota:
    """Set (replace) the quota of a user or group on `datastore` (None: all datastores); with no
    limit at all the quota is dropped. Images already there stay, even above a lower quota."""
    _check_subject_exists(directory, subject)
    for what, value in (("images", max_images), ("size", max_bytes)):
        if value is not None and value < 0:
            raise Refused(f"Invalid quota: --{what} {value} is negative; give 0 or more (or leave it out: no limit).")
    quota = Quota(subject=subject, datastore=datastore or None, max_images=max_images, max_bytes=max_bytes)
    catalog.save_quota(quota)
    return quota


def _check_subject_exists(directory: Directory, subject: QuotaSubject) -> None:
    exists = directory.user_exists if subject.kind is SubjectKind.USER else directory.group_exists
    if not exists(subject.name):
        raise NotFound(f"There is no {subject}: `hcx-image {subject.kind.value} list` shows them.")


def quota_report(catalog: Catalog, subject: QuotaSubject) -> list[dict]:
    """Each quota of the subject with what is used and left; a subject with no quota gets one row
    for all datastores, with no limits, so its usage still shows."""
    quotas = catalog.quotas_of(subject) or [Quota(subject=subject)]
    return [_report_row(quota, catalog.usage(subject, quota.datastore)) for quota in quotas]


def all_quotas_report(catalog: Catalog) -> list[dict]:
    """Every quota set, with what is used and left (the administrator's view)."""
    return [_report_row(quota, catalog.usage(quota.subject, quota.datastore)) for quota in catalog.all_quotas()]


def _report_row(quota: Quota, usage: QuotaUsage) -> dict:
    return {
        "kind": quota.subject.kind.value,
        "subject": quota.subject.name,
        "datastore": quota.datastore,
        "images": _amounts(quota.max_images, usage.images),
        "bytes": _amounts(quota.max_bytes, usage.bytes),
    }


def _amounts(limit: int | None, used: int) -> dict:
    return {"limit": limit, "used": used, "left": None if limit is None else max(limit - used, 0)}
