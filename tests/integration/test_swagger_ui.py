"""The Swagger UI at `/`, driven in headless Chromium the way a user tries the API out.

Needs Debian's chromium (`scripts/system-deps.sh browser`, which `./dev test` runs as root) and the
`playwright` package; Playwright's own browser download is not used. Screenshots of every test go
next to the server's log (the path is printed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from playwright import sync_api

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "red-circle-left.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# BentoML's stock page: its <title>, and the README it shows when a service has none of its own.
STOCK_TITLE = "BentoML Prediction Service"
STOCK_TEXT = ("This is a Machine Learning Service created with BentoML", "BentoML Slack",
              "Follow BentoML")
TIMEOUT_MS = 120_000  # a generate call on a cold server


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "chromium is not installed: run scripts/system-deps.sh browser as root"
    with sync_api.sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox does not start as root (CI containers)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, request):
    """A fresh page; its full-page screenshot is saved after the test, passed or failed."""
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    shot = server.log.parent / f"swagger-ui-{server.backend}-{request.node.originalname}.png"
    try:
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
    finally:
        context.close()


def open_ui(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector(".opblock-summary-path", timeout=TIMEOUT_MS)


def generate_form(page, url: str):
    """`POST /generate` expanded, with "Try it out" pressed: the form as it comes."""
    open_ui(page, url)
    op = page.locator(".opblock-post", has=page.locator('[data-path="/generate"]'))
    op.locator(".opblock-summary").click()
    op.locator(".try-out__btn").click()
    op.locator('tr[data-property-name="prompt"] input').wait_for()
    return op


def field(op, name: str):
    return op.locator(f'tr[data-property-name="{name}"]')


def execute(op) -> tuple[str, str]:
    """Press Execute; the status code and the response body as the page renders them."""
    op.locator("button.execute").click()
    status = op.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for(timeout=TIMEOUT_MS)
    body = op.locator(".live-responses-table .highlight-code code").first
    return status.inner_text().strip(), body.inner_text() if body.count() else ""


def test_page_shows_this_services_title_and_description(page, url):
    info = httpx.get(url + "/docs.json", timeout=30).json()["info"]
    open_ui(page, url)
    assert page.title() != STOCK_TITLE
    assert page.title() == info["title"]
    heading = page.locator(".info .title")
    assert heading.is_visible(), "the info title is hidden (BentoML's index.css hides it)"
    assert heading.inner_text().startswith(info["title"])
    assert info.get("version") not in (None, "", "None")
    text = page.locator(".info").inner_text()
    assert not [stock for stock in STOCK_TEXT if stock in text], text
    assert page.locator('.info img[src*="shields.io"], .info img[src*="badgen"]').count() == 0


def test_openai_routes_are_grouped_under_described_tags(page, url):
    spec = httpx.get(url + "/docs.json", timeout=30).json()
    described = {t["name"] for t in spec.get("tags", []) if t.get("description")}
    used = {tag for path, item in spec["paths"].items() if path.startswith("/v1/")
            for op in item.values() if isinstance(op, dict) for tag in op.get("tags", [])}
    assert used and used <= described, (used, described)
    open_ui(page, url)
    assert page.locator('.opblock-tag[data-tag="default"]').count() == 0


def test_optional_fields_are_not_prefilled_with_null(page, url):
    """An optional field's `default: null` reaches the form as the text "null" (and is sent)."""
    op = generate_form(page, url)
    rows = op.locator("tr[data-property-name]")
    names = [rows.nth(i).get_attribute("data-property-name") for i in range(rows.count())]
    assert {"system_prompt", "seed"} <= set(names), names
    texts = {name: [i.input_value() for i in field(op, name).locator("input[type=text]").all()]
             for name in names}
    assert [name for name, values in texts.items() if "null" in values] == []


def test_generate_with_an_uploaded_image(page, url):
    op = generate_form(page, url)
    files = field(op, "images").locator("input[type=file]")
    assert files.count() >= 1, "images: no file input until 'Add item' is pressed"
    files.first.set_input_files(str(EXAMPLE))
    field(op, "prompt").locator("input").fill("Describe the image.")
    status, body = execute(op)
    assert status == "200", body
    assert "a red circle on the left" in body


def test_generate_with_only_a_prompt(page, url):
    """The form as it comes, "Send empty value" ticks included, with a prompt typed."""
    op = generate_form(page, url)
    field(op, "prompt").locator("input").fill("Describe the image.")
    status, body = execute(op)
    assert status == "200", body
    assert isinstance(json.loads(body)["text"], str)
