"""Schemathesis against the image API's own OpenAPI, over real HTTP: no generated request gets a
500, and every 4xx says what was wrong (a `detail` sentence). The fuzzing user has a quota of no
image at all, so nothing it generates can start a copy of terabytes of zeros; admin-only paths
answer it 403, and it cannot see anyone's images."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

FUZZER = "mallory"


@pytest.fixture(scope="module")
def api_schema(image_api):
    from catalog.identity import open_directory
    from catalog.model import QuotaSubject, SubjectKind
    from catalog.quotas import set_quota
    from catalog.store import open_catalog

    open_directory().ensure_user(FUZZER, ["staff"])
    set_quota(open_catalog(), open_directory(), QuotaSubject(SubjectKind.USER, FUZZER), max_images=0, max_bytes=0)
    return schemathesis.openapi.from_url(f"{image_api}/openapi.json")


@pytest.fixture(scope="module")
def fuzzer_token(api_schema) -> str:
    from catalog.identity import open_directory

    return open_directory().issue_token(FUZZER)


def _operations(api_schema):
    return [result.ok() for result in api_schema.get_all_operations()]


# Hypothesis drives schemathesis's strategies directly: its pytest plugin does not run under
# pytest 9 (it reads `Function._nodeid`, which pytest 9 no longer has).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_500_and_every_refusal_says_why(api_schema, image_api, fuzzer_token, mode):
    operations = _operations(api_schema)
    assert len(operations) >= 30  # every verb, read from the service's own /openapi.json
    headers = {"Authorization": f"Bearer {fuzzer_token}"}
    for operation in operations:

        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def answers_well(case):
            response = case.call(base_url=image_api, headers=headers, timeout=60)
            said = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
            assert response.status_code < 500, said
            if 400 <= response.status_code < 500:
                try:
                    detail = response.json().get("detail")
                except ValueError:  # refused by the HTTP server itself (a malformed header), before the app
                    assert response.status_code == 400, said
                    return
                assert isinstance(detail, str) and len(detail) > 10, said

        try:
            answers_well()
        except Unsatisfiable:  # no invalid request exists for it (no parameters, no body): nothing to try
            assert mode is GenerationMode.NEGATIVE, operation.label


def test_the_schema_covers_every_verb(image_api):
    paths = httpx.get(f"{image_api}/openapi.json").json()["paths"]
    for path in ("/api/v1/images", "/api/v1/images/upload", "/api/v1/images/{image_id}/clone",
                 "/api/v1/images/{image_id}/chmod", "/api/v1/images/{image_id}/chown", "/api/v1/users",
                 "/api/v1/groups", "/api/v1/quotas", "/api/v1/datastores", "/api/v1/status",
                 "/api/v1/maintenance/reconcile", "/api/v1/runs/{flow_run_id}"):
        assert path in paths, path
    assert httpx.get(f"{image_api}/docs").status_code == 200
