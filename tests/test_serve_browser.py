"""The ICH web page end to end in a real browser: headless Chromium, driven by selenium, uploads a
PNG to the running server and sees the overlay and the numbers; a bad file shows a message.

Needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`). Without them
the test is skipped, unless MEDJAX_REQUIRE_BROWSER=1 (as in CI), where it fails instead.
"""

from __future__ import annotations

import os
import shutil
import threading

import cv2
import numpy as np
import pytest
from werkzeug.serving import make_server

from medjax import serve
from tests.test_serve import ThresholdPredictor

# Headless, and nothing that reaches the network or needs a sandbox (tests may run as root).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
PAGE_TIMEOUT_S = 15


def _find(names: tuple[str, ...], env: str) -> str | None:
    """The executable named by `env`, else the first of `names` on PATH or in /usr/bin."""
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    for name in names:
        path = shutil.which(name) or shutil.which(name, path="/usr/bin")
        if path:
            return path
    return None


def _skip_or_fail(message: str):
    if os.environ.get("MEDJAX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{message} (MEDJAX_REQUIRE_BROWSER=1 makes this an error)")
    pytest.skip(message)


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """A headless Chromium session with a fresh profile."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _skip_or_fail("selenium is not installed (pip install selenium)")
    chromium = _find(("chromium", "chromium-browser"), "MEDJAX_CHROMIUM")
    driver_path = _find(("chromedriver",), "MEDJAX_CHROMEDRIVER")
    if not chromium or not driver_path:
        _skip_or_fail(
            "Chromium or chromedriver not found; install them (Debian: apt-get install chromium "
            "chromium-driver) or point MEDJAX_CHROMIUM / MEDJAX_CHROMEDRIVER at them"
        )
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must never download a driver.
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


@pytest.fixture
def server_url(tmp_path):
    """The page served by werkzeug on 127.0.0.1 and a free port, in a thread."""
    upload_dir = tmp_path / "uploads"
    upload_dir.mkdir()
    app = serve.create_app(ThresholdPredictor(), upload_dir=str(upload_dir))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join()
    assert os.listdir(upload_dir) == []


def _upload(browser, url: str, path: str, window: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(url)
    browser.find_element(By.ID, "file").send_keys(path)
    Select(browser.find_element(By.ID, "window")).select_by_value(window)
    browser.find_element(By.ID, "submit").click()


def test_upload_in_a_browser_shows_overlay_and_numbers(browser, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    gray = np.full((40, 50), 100, np.uint8)
    gray[5:15, 5:10] = 255  # 80 HU once taken as a brain-window screenshot: 50 blood pixels.
    path = tmp_path / "head slice.png"
    cv2.imwrite(str(path), gray)
    _upload(browser, server_url, str(path), "subdural")

    size = WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: d.execute_script(
            "const img = document.getElementById('overlay');"
            "return img && img.complete && img.naturalWidth > 0"
            " ? [img.naturalWidth, img.naturalHeight] : null;"
        )
    )
    assert size == [50, 40]
    assert browser.find_element(By.ID, "probability").text == "Hemorrhage probability: 0.88"
    assert (
        browser.find_element(By.ID, "area").text == "Hemorrhage area: 50 px (pixel spacing unknown)"
    )
    assert browser.find_element(By.ID, "overlay").is_displayed()
    selected = Select(browser.find_element(By.ID, "window")).first_selected_option
    assert selected.get_attribute("value") == "subdural"

    text_file = tmp_path / "notes.dcm"
    text_file.write_text("not a scan\n" * 10)
    _upload(browser, server_url, str(text_file), "brain")
    error = WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: d.find_element(By.ID, "error"))
    assert error.text.startswith("notes.dcm is not a DICOM, NIfTI")
    assert not browser.find_elements(By.ID, "overlay")
