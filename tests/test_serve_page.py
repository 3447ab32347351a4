"""The chat page of `python -m gpt serve` in a real headless browser (Debian's chromium, driven by Selenium).

A server process on a small random-init checkpoint; the page is opened from it, a system prompt,
temperature 0 and a token limit are set, a message is sent, and the reply must stream in (seen
growing while the page is busy) and end as the greedy reply `gpt.generate` gives for the same chat
prompt. The Stop button must end a long reply early. A failing test leaves a screenshot and the page's
HTML beside it (the path is in the failure message).

Without chromium and chromedriver the tests skip, except where GPT_REQUIRE_BROWSER=1 (CI sets it and
installs them), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import save_checkpoint
from gpt.prompts import chat_prompt
from test_serve import TOKENIZER, greedy, start_server, stop, text_of, tiny_model, wait_ready

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    paths = chromium_paths()
    if paths is None:
        message = "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
        if os.environ.get("GPT_REQUIRE_BROWSER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=paths[1]))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    model = tiny_model(1024, seed=3)
    save_checkpoint(folder / "model.pt", model, tokenizer="gpt2")
    server = start_server(folder / "model.pt", model, folder / "server.log")
    try:
        wait_ready(server)
        yield server
    finally:
        stop(server)


@contextlib.contextmanager
def screenshot_on_failure(driver, folder: Path) -> Iterator[None]:
    try:
        yield
    except BaseException as failure:
        driver.save_screenshot(str(folder / "page.png"))
        (folder / "page.html").write_text(driver.page_source)
        raise AssertionError(f"{failure}\n(screenshot and HTML of the page in {folder})") from failure


def fill(driver, element_id: str, value: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def assistant_bubbles(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#messages .message.assistant")


def send_from_the_page(driver, server, prompt: str, **settings: str) -> None:
    """Open the page, wait for the model's name, fill the settings (element id -> value) and send `prompt`."""
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: "model:" in d.find_element(By.ID, "status").text)
    for element_id, value in settings.items():
        fill(driver, element_id.replace("_", "-"), value)
    fill(driver, "prompt", prompt)
    driver.find_element(By.ID, "send").click()


def test_a_message_streams_its_reply_in(browser, server, tmp_path):
    with screenshot_on_failure(browser, tmp_path):
        send_from_the_page(browser, server, "Tell me a story.", system="You answer briefly.", temperature="0",
                           max_tokens="300")

        partial_seen, deadline = False, time.monotonic() + 120
        while time.monotonic() < deadline:
            busy = browser.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "true"
            bubbles = assistant_bubbles(browser)
            if busy and bubbles and bubbles[-1].get_attribute("textContent"):
                partial_seen = True  # text on the page while the reply is still coming
            if not busy and bubbles:
                break
            time.sleep(0.02)
        reply = assistant_bubbles(browser)[-1].get_attribute("textContent")

        messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Tell me a story."}]
        ids = TOKENIZER.encode(chat_prompt(messages, TOKENIZER), allowed_special="all")
        with torch.no_grad():
            expected = text_of(greedy(server.model, ids, 300))
        assert reply == expected
        assert partial_seen, "the reply never showed while it was streaming"
        assert not browser.find_elements(By.CSS_SELECTOR, "#messages .message.error")


def test_stop_ends_a_long_reply(browser, server, tmp_path):
    with screenshot_on_failure(browser, tmp_path):
        send_from_the_page(browser, server, "Write a very long text.", temperature="1", max_tokens="900")
        WebDriverWait(browser, 60).until(lambda d: assistant_bubbles(d) and
                                         assistant_bubbles(d)[-1].get_attribute("textContent"))
        browser.find_element(By.ID, "stop").click()
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "false")
        assert assistant_bubbles(browser)[-1].get_attribute("textContent").endswith("[stopped]")
        WebDriverWait(browser, 30).until(lambda d: "cancel" in server.output() or "disconnect" in server.output())
