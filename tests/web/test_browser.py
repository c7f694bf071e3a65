"""The web demo in a real browser: Debian's Chromium, driven by Playwright, on the app served as the docs say.

These write the screenshots docs/web.md shows (docs/images/web-chat.png, web-attention.png).
"""

import os

import pytest
from conftest import IMAGES, SAMPLE
from playwright.sync_api import expect, sync_playwright


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
QUESTION = "How many shapes are there?"
TIMEOUT_MS = 60_000


@pytest.fixture
def page(demo_server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1100, "height": 860})
        page.goto(demo_server.url)
        yield page
        browser.close()


def ask(page, question: str, files=()) -> None:
    box = page.locator("#message")
    if files:
        box.locator("input[type=file]").set_input_files(list(files))
        expect(box.locator("img")).to_have_count(len(files), timeout=TIMEOUT_MS)  # the uploads' thumbnails
    box.locator("textarea").fill(question)
    box.locator("textarea").press("Enter")


def error_notice(page):
    return page.locator(".toast-body").last


def test_upload_ask_and_read_the_streamed_answer(page):
    answers = page.locator('#chatbot [data-testid="bot"]')
    ask(page, QUESTION, [SAMPLE])
    expect(answers).to_have_count(1, timeout=TIMEOUT_MS)
    expect(answers.last).to_have_text("3", timeout=TIMEOUT_MS)
    expect(page.locator('#chatbot [data-testid="user"] img')).to_have_count(1)  # the image shows in the chat
    page.screenshot(path=IMAGES / "web-chat.png")

    ask(page, QUESTION)  # a second turn about the same image: the conversation goes on
    expect(answers).to_have_count(2, timeout=TIMEOUT_MS)
    expect(answers.last).to_have_text("3", timeout=TIMEOUT_MS)

    page.locator("#clear").click()
    expect(answers).to_have_count(0, timeout=TIMEOUT_MS)


def test_attention_tab_draws_the_grid(page):
    page.get_by_role("tab", name="Layer attention").click()
    page.locator("#attention-image input[type=file]").set_input_files(SAMPLE)
    page.locator("#draw").click()
    picture = page.locator("#attention-maps img")
    expect(picture).to_be_visible(timeout=TIMEOUT_MS)
    width = picture.evaluate("image => image.naturalWidth")
    assert width == 3 * 224, width  # the demo tower's three layers side by side
    page.screenshot(path=IMAGES / "web-attention.png")


def test_bad_inputs_show_a_notice_and_the_app_keeps_answering(page, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    ask(page, QUESTION, [fake])
    expect(error_notice(page)).to_contain_text("fake.png is not an image", timeout=TIMEOUT_MS)

    page.reload()
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    page.locator("#message input[type=file]").set_input_files(notes)
    expect(error_notice(page)).to_contain_text("Invalid file type", timeout=TIMEOUT_MS)

    page.reload()
    page.locator("#message textarea").press("Enter")
    expect(error_notice(page)).to_contain_text("message was empty", timeout=TIMEOUT_MS)

    ask(page, QUESTION, [SAMPLE])
    expect(page.locator('#chatbot [data-testid="bot"]').last).to_have_text("3", timeout=TIMEOUT_MS)
