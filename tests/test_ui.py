"""The Prefect UI in a real browser: it asks for the auth string before anything; then the
deployments are there, and a finished upload run shows its table and progress artifacts."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from flows.launcher import deployable


def log_in(page, auth_string: str) -> None:
    """Prefect's login form: one password field (placeholder "admin:pass") and a Login button; the
    UI then sends the string as HTTP Basic auth and keeps it in the browser's localStorage."""
    page.get_by_placeholder("admin:pass").fill(auth_string)
    page.get_by_role("button", name="Login").click()
    expect(page).not_to_have_url(re.compile(r"/login\b"))


@pytest.fixture(scope="module")
def operator_page(platform, browser_page):
    """The module's browser page, logged in to the Prefect UI with the platform's auth string."""
    page = browser_page
    page.goto(f"{platform.ui_url}/login")
    log_in(page, platform.stack.auth_string())
    return page


def test_ui_asks_for_the_auth_string_first(platform, browser_page):
    page = browser_page
    page.goto(platform.ui_url)
    page.evaluate("localStorage.clear()")  # a browser that never logged in
    page.goto(f"{platform.ui_url}/deployments")
    expect(page).to_have_url(f"{platform.ui_url}/login?redirect=/deployments")
    page.get_by_placeholder("admin:pass").fill("not-the-auth-string")
    page.get_by_role("button", name="Login").click()
    expect(page.get_by_text("Authentication failed.").first).to_be_visible()
    expect(page).to_have_url(f"{platform.ui_url}/login?redirect=/deployments")

    log_in(page, platform.stack.auth_string())
    expect(page).to_have_url(f"{platform.ui_url}/deployments")
    expect(page.get_by_role("link", name="clone", exact=True).first).to_be_visible()


def test_ui_lists_the_deployments(platform, operator_page):
    """Every deployment: the first ten (A to Z) on the page, the others found with its search."""
    page = operator_page
    page.goto(f"{platform.ui_url}/deployments")
    expect(page.get_by_text(f"{len(deployable())} Deployments")).to_be_visible()
    names = sorted(deployable())
    for name in names[:10]:
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
    search = page.get_by_role("searchbox", name="Search deployments")
    for name in names[10:]:
        search.fill(name)
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
    search.fill("reconcile")
    expect(page.get_by_role("row", name="reconcile").get_by_text("maintenance")).to_be_visible()
    search.fill("upload")
    expect(page.get_by_role("row", name="upload").get_by_text("image-operation")).to_be_visible()


def test_ui_shows_a_finished_runs_table_and_progress_artifacts(platform, finished_upload, operator_page):
    page = operator_page
    run, image = finished_upload["flow_run"], finished_upload["image"]
    artifacts = platform.artifacts(run["id"])
    table = next(a for a in artifacts if a["key"] == "upload-images")
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert progress and json.loads(table["data"])[0]["name"] == finished_upload["name"]

    page.goto(f"{platform.ui_url}/runs/flow-run/{run['id']}")
    expect(page.get_by_text(run["name"]).first).to_be_visible()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.get_by_text("Artifacts", exact=True).first.click()
    expect(page.get_by_text("upload-images").first).to_be_visible()

    page.goto(f"{platform.ui_url}/artifacts/artifact/{table['id']}")
    expect(page.locator("td", has_text=finished_upload["name"]).first).to_be_visible()
    expect(page.locator("td", has_text="READY").first).to_be_visible()
    expect(page.locator("td", has_text=str(image.id)).first).to_be_visible()

    for artifact in progress:
        page.goto(f"{platform.ui_url}/artifacts/artifact/{artifact['id']}")
        expect(page.get_by_text("Progress: 100%")).to_be_visible()
        expect(page.get_by_text(artifact["description"])).to_be_visible()
