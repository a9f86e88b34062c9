"""The web page in a real browser: Debian's Chromium driven by its ChromeDriver (selenium downloads nothing here)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_serve import serving

pytest.importorskip("starlette")
NEEDS = "Chromium and ChromeDriver: `apt-get install chromium chromium-driver` (.ci/run installs them)"


@pytest.fixture()
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver_path):
        if os.environ.get("FRACTURE_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test needs {NEEDS} and selenium (dev extra)")
        pytest.skip(f"BROWSER TEST NOT RUN: needs {NEEDS} and selenium (dev extra)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


DROP = """
const [b64, name] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const dt = new DataTransfer();
dt.items.add(new File([bytes], name, { type: "image/png" }));
document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
"""


def _cards(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def _wait(driver, predicate, seconds: float = 60, message=lambda d: ""):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: predicate(d))
    except TimeoutException:
        raise AssertionError(f"not reached in {seconds} s; page shows: {message(driver)}") from None


def test_drop_and_pick_radiographs_and_see_probability_decisions_and_overlay(browser, loc_onnx: Path, loc_run: tuple[Path, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    image = sorted((loc_run[0] / "test" / "images").glob("*.png"))[0]
    with serving(loc_onnx, tmp_path / "server") as server:
        _, _, api = server.post([(image.name, image.read_bytes())], query="?images=0")
        expected = api["results"][0]
        browser.get(f"http://{server.host}:{server.port}/")
        _wait(browser, lambda d: "sha256" in d.find_element(By.ID, "model").text)
        assert "Research use only" in browser.find_element(By.ID, "notice").text

        browser.execute_script(DROP, base64.b64encode(image.read_bytes()).decode(), image.name)
        card = _wait(browser, lambda d: next((c for c in _cards(d) if c.find_elements(By.CLASS_NAME, "prob")), None))
        assert card.find_element(By.TAG_NAME, "h2").text == image.name
        shown = float(re.search(r"p\(fracture\) = ([0-9.]+)", card.find_element(By.CLASS_NAME, "prob").text).group(1))
        assert shown == pytest.approx(expected["probability"], abs=5e-4)
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        _wait(browser, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
        decisions = card.find_element(By.CLASS_NAME, "decisions").text
        for name, d in expected["decisions"].items():
            assert re.search(rf"{name} > [0-9.]+ {'fractured' if d['fractured'] else 'not fractured'}", decisions), decisions
        assert f"{len(expected['boxes'])} box" in card.text

        bad = tmp_path / "notes.txt"
        bad.write_text("not a radiograph")
        picked = [bad]
        try:
            from test_dicom import variants

            picture = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
            picked.append(variants.write_variants(picture, tmp_path / "dicom")["windowed_12bit_markers"])
        except ImportError:  # pydicom is in the dicom extra, which the test command installs
            pass
        browser.execute_script("document.getElementById('pick').style.display = 'block'")
        browser.find_element(By.ID, "pick").send_keys("\n".join(str(p) for p in picked))
        _wait(browser, lambda d: len(_cards(d)) == 1 + len(picked) and "predicting" not in d.find_element(By.ID, "results").text, message=lambda d: d.find_element(By.ID, "results").text)
        by_name = {c.find_element(By.TAG_NAME, "h2").text: c for c in _cards(browser)}
        assert "Cannot predict: not a decodable image" in by_name["notes.txt"].text
        if len(picked) > 1:
            dicom = by_name[picked[1].name]
            img = dicom.find_element(By.CSS_SELECTOR, "img.overlay")
            size = _wait(browser, lambda d: d.execute_script("return arguments[0].complete && [arguments[0].naturalWidth, arguments[0].naturalHeight]", img))
            assert size == [picture.shape[1], picture.shape[0]] and "p(fracture)" in dicom.text
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert np.std(cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)) > 10  # a rendered page, not a blank one
