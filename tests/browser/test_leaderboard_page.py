"""The leaderboard page in a real headless Chromium: rows, sorting, details, plot, screenshot.

Selected only with `-m browser` (scripts/ci_browser.sh installs chromium and chromium-driver,
the Debian packages, and runs this). A missing browser fails loudly: never a silent skip.
"""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.leaderboard import build_board, publish
from tests.leaderboard_fixtures import Spec, metrics_for, write_result

pytestmark = pytest.mark.browser

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--window-size=1500,1100")


@dataclass(frozen=True)
class Entrant:
    label: str  # what the Model column shows
    spec: Spec
    losses: tuple[float, ...] = ()  # the val_loss of each seed
    arc: float = 0.0

    @property
    def ranked(self) -> bool:
        return self.spec.status == "succeeded"


def _baseline(name: str, loss: float, arc: float) -> Entrant:
    spec = Spec(name=name, mode="baseline", agent="baseline", code=name)
    return Entrant(name, spec, (loss,), arc)


def _model(model: str, losses: tuple[float, ...], arc: float, status: str = "succeeded",
           mode: str = "vanilla") -> Entrant:
    spec = Spec(name=model, mode=mode, agent="llm", model=model, status=status,
                reason="ok" if status == "succeeded" else "training raised: boom")
    return Entrant(model, spec, losses, arc)


# ARC order differs from val_loss order, so sorting by either column is visible.
SMOKE = [_baseline("binary_sign", 7.9, 30.0), _baseline("int2_uniform", 7.5, 20.0),
         _baseline("ternary_158bit", 7.7, 35.0), _model("model-a", (7.5, 7.7), 40.0),
         _model("model-b", (7.4,), 25.0, mode="agent"),
         _model("model-c", (), 0.0, status="failed_submission")]
BIG = [_baseline("int2_uniform", 2.44, 53.8), _model("model-a", (2.55,), 50.1)]


def _write(runs: Path, entrants: list[Entrant], scale: str) -> None:
    for e in entrants:
        if not e.losses:
            write_result(runs, Spec(**{**e.spec.__dict__, "scale": scale}))
        for i, loss in enumerate(e.losses):
            write_result(runs, Spec(**{**e.spec.__dict__, "scale": scale,
                                       "name": f"{e.spec.name}" if e.spec.mode == "baseline"
                                       else f"{e.spec.name}-seed{i}",
                                       "metrics": metrics_for(loss, arc_easy=e.arc)}))


def _order(entrants: list[Entrant], value: Any, reverse: bool) -> list[str]:
    """Entrants sorted by value (ranked ones), then the unranked ones: the page's rule."""
    ranked = sorted((e for e in entrants if e.ranked), key=value, reverse=reverse)
    return [e.label for e in ranked] + [e.label for e in entrants if not e.ranked]


def _mean_loss(e: Entrant) -> float:
    return statistics.mean(e.losses)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    _write(runs, SMOKE, "smoke")
    _write(runs, BIG, "gpt-345m")
    return publish(build_board([runs]), tmp_path_factory.mktemp("board"))


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("headless Chromium is needed: apt-get install -y chromium chromium-driver "
                    "(scripts/ci_browser.sh does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    # The system chromedriver, named explicitly: selenium never downloads a driver.
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield drv
    finally:
        drv.quit()


def _table(driver: Any, scale: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f'table.board[data-scale="{scale}"]')


def _models(table: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    cells = table.find_elements(By.CSS_SELECTOR, "tbody.entry tr.row td.entrant")
    # The baseline badge is part of the cell's text; the name is its first word.
    return [c.text.split()[0] for c in cells]


def _click_header(table: Any, text: str) -> None:
    from selenium.webdriver.common.by import By

    heads = [h for h in table.find_elements(By.CSS_SELECTOR, "thead th")
             if h.text.startswith(text)]
    assert len(heads) == 1, [h.text for h in table.find_elements(By.CSS_SELECTOR, "thead th")]
    heads[0].find_element(By.CSS_SELECTOR, "button.sort").click()


def test_leaderboard_page_in_chromium(driver: Any, page: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.webdriver.common.by import By

    driver.get(page.resolve().as_uri())
    assert "Leaderboard" in driver.title

    # One table per scale, each with its own rows, in rank order (unranked last).
    scales = [t.get_attribute("data-scale")
              for t in driver.find_elements(By.CSS_SELECTOR, "table.board")]
    assert sorted(scales) == ["gpt-345m", "smoke"]
    smoke = _table(driver, "smoke")
    assert _models(smoke) == _order(SMOKE, _mean_loss, reverse=False)
    assert _models(_table(driver, "gpt-345m")) == _order(BIG, _mean_loss, reverse=False)
    baselines = smoke.find_elements(By.CSS_SELECTOR, "tbody.baseline td.entrant")
    assert sorted(c.text.split()[0] for c in baselines) == sorted(
        e.label for e in SMOKE if e.spec.mode == "baseline")
    assert all("baseline" in c.text for c in baselines)

    # ARC-Easy is ↑: the first click puts the highest first, the second reverses; the failed
    # row stays last both times.
    _click_header(smoke, "ARC-Easy")
    assert _models(smoke) == _order(SMOKE, lambda e: e.arc, reverse=True)
    _click_header(smoke, "ARC-Easy")
    assert _models(smoke) == _order(SMOKE, lambda e: e.arc, reverse=False)
    _click_header(smoke, "Model")
    assert _models(smoke) == sorted(e.label for e in SMOKE)

    # A row's details open on click and show the diff, checks and hashes.
    first = smoke.find_element(By.CSS_SELECTOR, "tbody.entry")
    more = first.find_element(By.CSS_SELECTOR, "tr.more")
    assert not more.is_displayed()
    button = first.find_element(By.CSS_SELECTOR, "button.toggle")
    button.click()
    assert more.is_displayed() and button.get_attribute("aria-expanded") == "true"
    text = more.text
    assert "Region diff against the template" in text and "@@" in text
    assert "pre-flight" in text and "spliced" in text and "Hardware" in text
    driver.execute_script("arguments[0].scrollIntoView();", first)

    # The validation-loss plot: an inline SVG with drawn lines, one per table.
    plots = driver.find_elements(By.CSS_SELECTOR, "figure.plot svg")
    assert len(plots) == 2
    assert all(p.is_displayed() and p.size["width"] > 100 for p in plots)
    assert plots[0].find_elements(By.CSS_SELECTOR, "path")

    shot = tmp_path / "leaderboard.png"
    driver.execute_script("window.scrollTo(0, 0);")
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nleaderboard screenshot: {shot}\nleaderboard page: {page}")


@pytest.fixture(scope="module")
def seeded_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The page `harness baselines --scale smoke --seeds 3` writes: three real seeds of each
    baseline on CPU, and the command's own table."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("seeded")
    proc = subprocess.run([sys.executable, "-m", "harness", "baselines", "--scale", "smoke",
                           "--seeds", "3", "--runs-dir", "runs", "--data-dir", "data"],
                          cwd=work, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "runs" / "leaderboard" / "index.html", proc.stdout


def test_three_seeds_show_as_n_3_with_intervals_and_error_bands(
        driver: Any, seeded_page: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from selenium.webdriver.common.by import By

    page, table_text = seeded_page
    driver.get(page.resolve().as_uri())
    smoke = _table(driver, "smoke")
    rows = smoke.find_elements(By.CSS_SELECTOR, "tbody.entry tr.row")
    assert len(rows) == 3  # one row per baseline, its seeds aggregated
    for row in rows:
        cells = row.find_elements(By.CSS_SELECTOR, "td")
        assert cells[5].text == "3"  # n
        val = row.find_element(By.CSS_SELECTOR, 'td[data-metric="val_loss"]')
        assert "±" in val.text  # the 95% interval
        ci = val.find_element(By.CSS_SELECTOR, "span.std")
        assert "95% confidence interval" in (ci.get_attribute("title") or "")
    # Every rank is a number, with the tie mark where Welch's test cannot tell rows apart.
    ranks = [r.find_elements(By.CSS_SELECTOR, "td")[1].text.split()[0] for r in rows]
    assert all(x.isdigit() for x in ranks) and ranks[0] == "1"
    # The plot draws an error band per row, visible in the browser.
    bands = driver.find_elements(By.CSS_SELECTOR, 'figure.plot svg g[id^="ci-"]')
    assert len(bands) == 3 and all(b.find_elements(By.CSS_SELECTOR, "path") for b in bands)
    caption = driver.find_element(By.CSS_SELECTOR, "figure.plot figcaption").text
    assert "95% confidence interval of the mean over the seeds" in caption
    with capsys.disabled():
        print(f"\nbaselines at smoke, 3 seeds each:\n{table_text}")
