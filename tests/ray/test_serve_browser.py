"""The search page in a real headless Chromium against a real local Ray Serve: a text query, an image upload and a
click on a hit each fill the grid with k tiles that show scores; a screenshot is saved (docs/img/serve.png).

Needs Debian's `chromium` and `chromium-driver` (no browser is downloaded at run time) and selenium; skips saying
which is missing otherwise. GALAXALIGN_SCREENSHOT=path saves the final page there (the README's picture)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from serve_helpers import build_world, start_serve

from conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 60  # one query is ~0.1 s; the first ones also load the page, thumbnails and the model's first batch


def _binaries() -> tuple[str, str]:
    browser = next((b for name in BROWSERS if (b := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = [
            n
            for n, found in ((f"a browser ({', '.join(BROWSERS)})", browser), ("chromedriver", driver))
            if not found
        ]
        pytest.skip(
            f"not found on PATH: {' and '.join(missing)}; install Debian's chromium and chromium-driver "
            "(`make browser` does, as root)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = _binaries()
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])"
    )
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium  # with both paths given, Selenium Manager downloads nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ray

    world = build_world(tmp_path_factory.mktemp("serve_browser"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield start_serve(world, free_port()), world
    finally:
        from galaxalign_dist.launch import serve_app

        serve_app.stop()
        ray.shutdown()


def _wait(driver, condition, what: str):  # noqa: ANN001, ANN202
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        condition, message=f"waited {WAIT_S} s for {what}"
    )


def _grid(driver, k: int, status_prefix: str) -> list:  # noqa: ANN001
    """The result tiles once the page says it shows `k` results (the status line changes on every answer)."""
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "status").text.startswith(status_prefix), status_prefix)
    tiles = driver.find_elements(By.CSS_SELECTOR, "#results .tile")
    assert len(tiles) == k
    for tile in tiles:
        assert re.fullmatch(r"#\d+\s+-?\d\.\d{3}", tile.find_element(By.CLASS_NAME, "score").text), tile.text
        assert tile.find_element(By.CLASS_NAME, "gid").text
    return tiles


def test_text_image_and_click_queries_fill_the_grid(browser, url, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, world = url
    browser.get(base)
    _wait(browser, lambda d: "galaxies" in d.find_element(By.ID, "provenance").text, "provenance")
    assert "64 galaxies" in browser.find_element(By.ID, "provenance").text
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sample .tile")) == 12, "the sample strip")

    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    browser.find_element(By.ID, "text").send_keys("a smooth round galaxy")
    browser.find_element(By.ID, "text-go").click()
    _grid(browser, 5, "5 results, page 1")
    assert "smooth round galaxy" in browser.find_element(By.ID, "query-view").text

    image = tmp_path / "query.png"
    image.write_bytes(
        pq.read_table(world / "data" / "test" / "part-00000.parquet").column("image")[3].as_py()
    )
    browser.find_element(By.ID, "file").send_keys(str(image))
    _wait(browser, lambda d: "query.png" in d.find_element(By.ID, "query-view").text, "the uploaded query")
    tiles = _grid(browser, 5, "5 results, page 1")
    assert tiles[0].find_element(By.CLASS_NAME, "score").text.endswith("1.000")  # the galaxy itself

    clicked = tiles[1].get_attribute("data-id")
    tiles[1].click()
    _wait(browser, lambda d: d.find_element(By.ID, "gid").get_attribute("value") == clicked, "the clicked id")
    tiles = _grid(browser, 5, "5 results, page 1")
    assert clicked not in {t.get_attribute("data-id") for t in tiles}  # more like it, itself excluded

    browser.find_element(By.ID, "next").click()
    _grid(browser, 5, "5 results, page 2")
    assert browser.find_element(By.CSS_SELECTOR, "#results .tile .score").text.startswith("#6 ")

    Select(browser.find_element(By.ID, "k")).select_by_visible_text("20")  # a fuller grid for the picture
    _grid(browser, 20, "20 results, page 1")
    _wait(
        browser,
        lambda d: d.execute_script(
            "return [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        ),
        "every thumbnail",
    )
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
    shot = Path(os.environ.get("GALAXALIGN_SCREENSHOT", tmp_path / "serve.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
