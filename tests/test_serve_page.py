"""The playground page in a real headless Chromium: type a prompt, press Generate, watch the text stream in.

Uses the system's chromium and chromedriver (Debian: apt-get install chromium chromium-driver); nothing
is downloaded. CI installs them, so this test runs there.
"""

import shutil
import time

import httpx
import openai
import pytest

from gpt.checkpoint import load_checkpoint
from gpt.serve import background, create_app
from gpt.serve_schema import Limits

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium or chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return load_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def url(checkpoint):
    with background(create_app(checkpoint, model_name="tiny", limits=Limits(max_tokens=10_000))) as address:
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


def wait_until_finished(browser, seconds: float = 120) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, seconds).until(lambda _: status.get_attribute("data-state") in ("done", "error"))
    return status.get_attribute("data-state")


def test_typing_a_prompt_streams_the_models_text(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url)
    assert browser.find_element(By.ID, "model").text == "tiny"
    fill(browser, "prompt", "The Queen")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "30")
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    assert wait_until_finished(browser) == "done", status.text
    shown = browser.find_element(By.ID, "completion").get_attribute("textContent")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    expected = client.completions.create(model="tiny", prompt="The Queen", max_tokens=30, temperature=0).choices[0]
    assert shown == expected.text and shown
    assert int(browser.find_element(By.ID, "completion").get_attribute("data-chunks")) > 2  # it came in pieces
    assert browser.find_element(By.ID, "prompt-echo").text == "The Queen"
    assert status.text == f"done: {expected.finish_reason}"


def test_a_refused_request_shows_the_servers_message(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url)
    fill(browser, "max-tokens", "0")
    browser.find_element(By.ID, "generate").click()
    assert wait_until_finished(browser, 60) == "error"
    assert "max_tokens" in browser.find_element(By.ID, "status").text


def test_stop_button_ends_the_generation_on_the_server(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = httpx.get(f"{url}/health").json()
    browser.get(url)
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "10000")  # ~20 s of generation unless stopped
    browser.find_element(By.ID, "generate").click()
    completion = browser.find_element(By.ID, "completion")
    WebDriverWait(browser, 60, poll_frequency=0.02).until(lambda _: completion.get_attribute("textContent"))
    browser.find_element(By.ID, "stop").click()
    assert wait_until_finished(browser, 60) == "done"
    assert browser.find_element(By.ID, "status").text == "stopped"
    deadline = time.monotonic() + 300  # only a server that ignores the disconnect gets near this
    while (health := httpx.get(f"{url}/health").json())["queued"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["cancelled_streams"] == before["cancelled_streams"] + 1


def test_the_key_field_appears_when_the_server_needs_a_key(browser, checkpoint):
    from selenium.webdriver.common.by import By

    with background(create_app(checkpoint, model_name="tiny", api_key="sesame")) as address:
        browser.get(address)
        assert browser.find_element(By.ID, "api-key").is_displayed()
        browser.find_element(By.ID, "generate").click()
        assert wait_until_finished(browser, 60) == "error"
        assert "API key" in browser.find_element(By.ID, "status").text
        fill(browser, "api-key", "sesame")
        browser.find_element(By.ID, "generate").click()
        assert wait_until_finished(browser, 60) == "done"
        assert browser.find_element(By.ID, "completion").get_attribute("textContent")
