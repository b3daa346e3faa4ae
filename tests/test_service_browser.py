"""The web page, end to end: a real uvicorn server and Debian's headless Chromium (via Selenium and
chromedriver). Skipped only where /usr/bin/chromium is absent (CI installs it: see .ci/run)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import served, small_collection

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "browser-test-token"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium chromium-driver)"
)


@pytest.fixture()
def server(tmp_path, tiny_extractor, train_vectors, image_dir):
    """A uvicorn server on a free loopback port, in a thread, over a small collection, with its
    model processes (the default of `activeindex serve`)."""
    from activeindex.service import create_app

    app = create_app(small_collection(tmp_path / "c", tiny_extractor, train_vectors, image_dir), token=TOKEN, model_processes=None)  # as `activeindex serve` runs it
    with served(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    # An explicit chromedriver: Selenium Manager would try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_finds_an_uploaded_image_and_compares_an_activated_one(server, browser, image_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(server + "/")
    wait.until(lambda d: "images" in d.find_element(By.ID, "collection-info").text)
    assert "8 images" in browser.find_element(By.ID, "collection-info").text

    # Search: pick an indexed image; its match comes first, with its thumbnail, score and decision.
    query = sorted(image_dir.glob("*.png"))[5]
    browser.find_element(By.ID, "query-file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches li")) == 8)
    first = browser.find_elements(By.CSS_SELECTOR, "#matches li")[0]
    assert first.find_element(By.CSS_SELECTOR, ".name").text == query.name
    badge = first.find_element(By.CSS_SELECTOR, ".badge")
    assert badge.text == "no verdict" and "threshold" in badge.get_attribute("title")
    float(first.find_element(By.CSS_SELECTOR, ".score").text)
    thumb = first.find_element(By.TAG_NAME, "img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) > 0)
    assert "8 matches" in browser.find_element(By.ID, "query-status").text

    # Activate & compare: the original, its released version and the amplified difference, with PSNR.
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="activate"]').click()
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    original = sorted(image_dir.glob("*.png"))[20]
    browser.find_element(By.ID, "activate-file").send_keys(str(original))
    wait.until(EC.visibility_of_element_located((By.ID, "compare")))
    stats = browser.find_element(By.ID, "compare-stats").text
    assert "PSNR" in stats and "dB" in stats
    psnr = float(stats.split("PSNR ")[1].split(" dB")[0])
    assert psnr >= 42.0
    size = browser.execute_script(
        "return ['cv-original','cv-activated','cv-diff'].map(id => "
        "[document.getElementById(id).width, document.getElementById(id).height])"
    )
    assert size == [[64, 48]] * 3
    # The amplified difference is not black: the released file differs from the original.
    lit = browser.execute_script(
        "const c = document.getElementById('cv-diff'); const d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i] + d[i+1] + d[i+2] > 0) n++; return n;"
    )
    assert lit > 0


def test_page_error_paths_leave_nothing_stale_and_resend_the_same_file(server, browser, image_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.set_window_size(390, 844)  # a phone
    browser.get(server + "/")
    wait.until(lambda d: "images" in d.find_element(By.ID, "collection-info").text)
    status = browser.find_element(By.ID, "query-status")
    # First load: no result box, so no empty (broken) preview image.
    assert not browser.find_element(By.ID, "query-result").is_displayed()

    query = sorted(image_dir.glob("*.png"))[5]
    browser.find_element(By.ID, "query-file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches li")) == 8)
    # The same file again, with another k: it is sent again (the input was reset).
    k = browser.find_element(By.ID, "query-k")
    k.clear()
    k.send_keys("3")
    browser.find_element(By.ID, "query-file").send_keys(str(query))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#matches li")) == 3)
    assert "3 matches" in status.text

    # A failed upload: the reason, and none of the previous query's matches under the new name.
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    browser.find_element(By.ID, "query-file").send_keys(str(not_image))
    wait.until(lambda d: "415" in status.text)
    assert "notes.png" in status.text and "not an image file" in status.text
    assert "error" in status.get_attribute("class")
    assert not browser.find_element(By.ID, "query-result").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#matches li") == []

    # Activate: a wrong token is refused; fixed, the same file is sent again and compared.
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="activate"]').click()
    astatus = browser.find_element(By.ID, "activate-status")
    token = browser.find_element(By.ID, "token")
    token.send_keys("wrong")
    original = sorted(image_dir.glob("*.png"))[20]
    browser.find_element(By.ID, "activate-file").send_keys(str(original))
    wait.until(lambda d: "403" in astatus.text or "401" in astatus.text)
    token.clear()
    token.send_keys(TOKEN)
    browser.find_element(By.ID, "activate-file").send_keys(str(original))
    wait.until(EC.visibility_of_element_located((By.ID, "compare")))
    # At phone width the three pictures are stacked, each about the page's width, and their
    # labels do not break mid-word.
    widths = browser.execute_script(
        "return ['cv-original','cv-activated','cv-diff'].map(id => document.getElementById(id).clientWidth)")
    assert min(widths) > 300, widths
    caption = browser.find_element(By.CSS_SELECTOR, "#cv-original + figcaption")
    assert caption.size["height"] < 30  # "original" on one line

    # A PSNR floor out of range: a sentence from the page, no request, no raw 422 JSON.
    psnr = browser.find_element(By.ID, "psnr")
    psnr.clear()
    psnr.send_keys("5")
    browser.find_element(By.ID, "activate-file").send_keys(str(sorted(image_dir.glob("*.png"))[21]))
    wait.until(lambda d: "PSNR" in astatus.text)
    assert "from 10 to 80" in astatus.text and "[{" not in astatus.text and "error" in astatus.get_attribute("class")
    assert not browser.find_element(By.ID, "compare").is_displayed()
    assert "9 images" in browser.find_element(By.ID, "collection-info").text  # only the activated one added
