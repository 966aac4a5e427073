"""The Prefect UI in a real browser: the deployments are there, and a finished upload run shows
its table and progress artifacts."""

from __future__ import annotations

import json

from playwright.sync_api import expect

from flows.launcher import deployable


def test_ui_lists_the_deployments(platform, browser_page):
    page = browser_page
    page.goto(f"{platform.ui_url}/deployments")
    for name in deployable():
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()
    expect(page.get_by_role("row", name="reconcile").get_by_text("maintenance")).to_be_visible()
    expect(page.get_by_role("row", name="upload").get_by_text("image-operation")).to_be_visible()


def test_ui_shows_a_finished_runs_table_and_progress_artifacts(platform, finished_upload, browser_page):
    page = browser_page
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
