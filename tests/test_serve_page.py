"""The playground page in a real headless Chromium: type a prompt, press Generate, watch the text stream in.

Uses the system's chromium and chromedriver (Debian: apt-get install chromium chromium-driver); nothing
is downloaded. CI installs them, so this test runs there.
"""

import shutil

import openai
import pytest

from gpt.checkpoint import load_checkpoint
from gpt.serve import background, create_app

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium or chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def url(tiny_run):
    with background(create_app(load_checkpoint(tiny_run), model_name="tiny")) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def fill(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(value)


def test_typing_a_prompt_streams_the_models_text(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    assert browser.find_element(By.ID, "model").text == "tiny"
    fill(browser, "prompt", "The Queen")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "30")
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 120).until(lambda _: status.get_attribute("data-state") in ("done", "error"))
    assert status.get_attribute("data-state") == "done", status.text
    shown = browser.find_element(By.ID, "completion").get_attribute("textContent")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    expected = client.completions.create(model="tiny", prompt="The Queen", max_tokens=30, temperature=0).choices[0]
    assert shown == expected.text and shown
    assert int(browser.find_element(By.ID, "completion").get_attribute("data-chunks")) > 2  # it came in pieces
    assert browser.find_element(By.ID, "prompt-echo").text == "The Queen"
    assert status.text == f"done: {expected.finish_reason}"


def test_a_refused_request_shows_the_servers_message(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    fill(browser, "max-tokens", "0")
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 60).until(lambda _: status.get_attribute("data-state") in ("done", "error"))
    assert status.get_attribute("data-state") == "error" and "max_tokens" in status.text
