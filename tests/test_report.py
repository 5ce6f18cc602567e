"""The browser report (`igctl show --html`, `igd batch --report`), opened in a real headless
chromium driven by selenium, with the network off: one row per result, sorting and filtering
change the rows, a click shows the full picture and the provenance, no console errors, and a
1,000-result page stays small and paged."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import require_tool
from daemon import IGCTL, IGD, Igd
from igd.output import report as pages

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test dependency")
By = pytest.importorskip("selenium.webdriver.common.by").By


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless chromium, offline: a report that fetched anything from the network would fail."""
    require_tool("chromium", package="chromium")
    driver_path = require_tool("chromedriver", package="chromium-driver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    yield driver
    driver.quit()


def opened(browser, page: Path) -> list:
    """``page`` loaded; its rows (tr.row), after asserting the console stayed clean."""
    browser.get(page.absolute().as_uri())
    errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    return browser.find_elements(By.CSS_SELECTOR, "tr.row")


def column(browser, name: str) -> list[str]:
    return [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, f"tr.row td.{name}")]


@pytest.fixture(scope="module")
def results(lanet: Igd, fixtures: Path) -> Iterator[Path]:
    """Four result files of the LaNet fixture (two targets in one, curves in another; one to
    an estimated 4 %, one of 3 steps: far off) and one that is not a result."""
    from daemon import short_tempdir

    folder = short_tempdir()
    image = fixtures / "images"
    runs = {"cat.gzip": [str(image / "chelsea.png"), "cat", "--tolerance", "0.04"],
            "coffee.gzip": [str(image / "coffee.png"), "--metrics", "insertion,deletion", "--steps", "16"],
            "two.gzip": [str(image / "chelsea.png"), "-t", "cat", "-t", "dog", "--steps", "16"],
            "rough.gzip": [str(image / "coffee.png"), "ship", "--steps", "3"]}
    for name, args in runs.items():
        run = lanet.igctl("attribute", *args, "-o", str(folder / name))
        assert run.returncode == 0, run.stderr.decode()
    (folder / "broken.gzip").write_bytes(b"\x1f\x8b not a result")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_report_of_result_files(browser, results: Path) -> None:
    files = sorted(results.glob("*.gzip"))
    page = results / "report" / "index.html"
    made = subprocess.run([IGCTL, "show", *map(str, files), "--html", str(page)], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 1, made.stderr  # one file is not a result
    assert f"report written to {page} (5 results, 1 unreadable" in made.stdout
    assert "broken.gzip: not an igd result" in made.stderr
    rows = opened(browser, page)
    assert len(rows) == 5  # one row per file, the unreadable one included
    assert sorted(column(browser, "file")) == sorted(f"../{f.name}" for f in files)
    assert all(browser.execute_script(
        "return [...document.querySelectorAll('img.thumb')].map(i => i.complete && i.naturalWidth === 128)"))
    broken = browser.find_element(By.CSS_SELECTOR, "tr.failed")
    assert "not an igd result" in broken.text

    # sorting by the estimated error: ascending, then descending, failed rows last
    header = browser.find_element(By.CSS_SELECTOR, 'th[data-key="error"]')
    header.click()
    shown = json.loads(browser.find_element(By.ID, "data").get_attribute("textContent"))
    errors = {row["file"]: row["error"] for row in shown}
    ordered = [errors[name] for name in column(browser, "file")]
    assert ordered[:4] == sorted(ordered[:4]) and ordered[4] is None
    header.click()
    ordered = [errors[name] for name in column(browser, "file")]
    assert ordered[:4] == sorted(ordered[:4], reverse=True)

    # filtering: by class, and the inaccurate or failed ones
    browser.find_element(By.CSS_SELECTOR, '#class-filter option[value="dog"]').click()
    dogs = column(browser, "file")
    assert "../two.gzip" in dogs and len(dogs) < 5
    assert all("dog" in row["classes"] for row in shown if row["file"] in dogs)
    browser.find_element(By.CSS_SELECTOR, '#class-filter option[value=""]').click()
    browser.find_element(By.ID, "inaccurate-filter").click()
    flagged = set(column(browser, "file"))
    assert "../broken.gzip" in flagged and "../rough.gzip" in flagged  # 3 steps: far off
    assert all(row["error"] is None or row["error"] > pages.INACCURATE_ABOVE or not row["ok"]
               for row in shown if row["file"] in flagged)
    assert len(flagged) < 5
    browser.find_element(By.ID, "inaccurate-filter").click()

    # a click: the full picture (both targets' panels) and the provenance
    next(row for row in browser.find_elements(By.CSS_SELECTOR, "tr.row") if "two.gzip" in row.text).click()
    dialog = browser.find_element(By.ID, "detail")
    assert dialog.get_attribute("open") is not None
    assert browser.execute_script("const i = document.getElementById('detail-picture');"
                                  "return i.complete ? i.naturalWidth : -1") == 2 * 448
    facts = browser.find_element(By.ID, "detail-facts").text
    assert "weights_sha256" in facts and "model_family lanet" in facts
    insertion = next(row for row in shown if row["file"] == "../coffee.gzip")["insertion"]
    assert insertion is not None and 0 <= insertion <= 1
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_a_thousand_results_stay_small_and_paged(browser, tmp_path: Path) -> None:
    """1,000 rows with provenance: under 1.5 MB of page (a row is about a kilobyte), 100 shown at a time."""
    provenance = {"weights_sha256": "ab" * 32, "model_family": "efficientnet-lite", "input_size": [224, 224],
                  "mean": [0.498, 0.498, 0.498], "std": [0.502, 0.502, 0.502], "created": "2026-12-06T12:00:00.000+00:00",
                  "igd_version": "0.1", "torch_version": "2.14.1", "preprocessing_source": "built-in"}
    rows = [pages.row_of_summary({"targets": [{"index": i % 7, "name": f"class {i % 7}"}],
                                  "prediction": {"index": i % 5, "name": f"class {i % 5}", "probability": 0.5},
                                  "error_estimate": (i % 13) / 100, "completeness_gap": 0.01, "n_steps": 50,
                                  "provenance": provenance}, f"results/{i:04d}.gzip", None, None)
            for i in range(1000)]
    page = tmp_path / "big.html"
    pages.write_report(page, rows, "a thousand")
    assert page.stat().st_size < 1.5e6, page.stat().st_size
    assert len(opened(browser, page)) == pages.PAGE_SIZE
    assert browser.find_element(By.ID, "shown").text == "1-100 of 1000 shown (1000 in all)"
    browser.find_element(By.ID, "next").click()
    assert column(browser, "file")[0] == "results/0100.gzip"
    browser.find_element(By.CSS_SELECTOR, '#class-filter option[value="class 6"]').click()
    assert browser.find_element(By.ID, "shown").text.endswith("of 142 shown (1000 in all)")  # 0..999 with i % 7 == 6 (and none of % 5)


@pytest.mark.slow  # igd batch runs of its own
def test_igd_batch_keeps_a_report(browser, fixtures: Path, tmp_path: Path) -> None:
    images, out = tmp_path / "in", tmp_path / "out"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        shutil.copy(fixtures / "images" / name, images / name)
    (images / "broken.png").write_bytes(b"not an image")
    command = [IGD, "batch", str(images), str(out), "-bp", str(fixtures / "bit-tiny.pth"), "--steps", "8",
               "--max-batch", "16", "-t", "cat", "--report"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # the broken image failed
    page = out / "report.html"
    assert f"report written to {page}" in run.stdout
    assert 'http-equiv="refresh"' not in page.read_text()  # finished: no more reloading
    rows = opened(browser, page)
    assert len(rows) == 3 and len(browser.find_elements(By.CSS_SELECTOR, "tr.failed")) == 1
    assert "bad_image" in browser.find_element(By.CSS_SELECTOR, "tr.failed").text
    assert sorted(column(browser, "targets")) == ["cat", "cat", "cat"]
    statuses = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    shown = json.loads(browser.find_element(By.ID, "data").get_attribute("textContent"))
    by_file = {row["file"]: row for row in shown}
    for status in statuses:
        if status["ok"]:
            assert by_file[status["output"]]["error"] == pytest.approx(status["error_estimate"])
            assert (out / by_file[status["output"]]["picture"]).is_file()
            assert by_file[status["output"]]["picture"].startswith("report-files/")
    (images / "broken.png").write_bytes((fixtures / "images" / "chelsea.png").read_bytes())
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    rows = opened(browser, page)  # the earlier run's rows, and the retried pair now done
    assert len(rows) == 3 and not browser.find_elements(By.CSS_SELECTOR, "tr.failed")
