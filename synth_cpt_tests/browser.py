"""Debian's Chromium driven by Selenium for the UI tests: nothing is downloaded (the driver's path is given,
so Selenium Manager never runs), every step leaves a screenshot, and a wait that fails leaves the
screenshot and the page source beside it and names them in the assertion."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1600,1000",
)  # fmt: skip


def missing_browser() -> str | None:
    """Why the browser cannot start (the test fails with it: `make test-ui` installs both), or None."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return f"{' and '.join(missing)} not installed: run `make browser` (Debian's chromium and chromium-driver)"
    return None


def shots_dir() -> Path:
    """$SYNTH_CPT_UI_SHOTS (what `make test-ui` sets), else a fresh temporary folder."""
    where = os.environ.get("SYNTH_CPT_UI_SHOTS")
    path = Path(where) if where else Path(tempfile.mkdtemp(prefix="synth_cpt_ui_shots_"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """One Chromium tab on the Dagster UI: navigation, explicit waits, screenshots."""

    def __init__(self, driver: Any, base_url: str, shots: Path) -> None:
        self.driver, self.base_url, self.shots = driver, base_url.rstrip("/"), shots
        self.saved: list[Path] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)

    def shot(self, name: str) -> Path:
        path = self.shots / f"{len(self.saved) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.saved.append(path)
        print(f"screenshot: {path}")
        return path

    def evidence(self, name: str) -> str:
        """The screenshot and page source of a failed wait: where to look, for the assertion message."""
        png = self.shots / f"FAILED-{name}.png"
        html = self.shots / f"FAILED-{name}.html"
        with contextlib.suppress(Exception):
            self.driver.save_screenshot(str(png))
        with contextlib.suppress(Exception):
            html.write_text(self.driver.page_source, encoding="utf-8")
        return f"screenshot {png}, page source {html}, url {self.driver.current_url}"

    def wait(self, what: str, condition: Callable[[Any], Any], timeout: float = 30) -> Any:
        """The condition's first truthy value; on timeout an AssertionError naming `what` and the evidence."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)).until(
                condition
            )
        except TimeoutException:
            where = self.evidence(re.sub(r"\W+", "_", what).strip("_"))
            raise AssertionError(f"the UI did not show {what} within {timeout:.0f} s: {where}") from None

    def visible(self, xpath: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        found = []
        for element in self.driver.find_elements(By.XPATH, xpath):
            with contextlib.suppress(Exception):
                if element.is_displayed():
                    found.append(element)
        return found

    def wait_visible(self, what: str, xpath: str, timeout: float = 30) -> Any:
        return self.wait(what, lambda d: (self.visible(xpath) or [None])[0], timeout)

    def read(self, what: str, xpath: str, attribute: Callable[[Any], Any], timeout: float = 30) -> Any:
        """`attribute` of the first visible element, read inside the wait, so a re-render between finding and
        reading the element only means another poll."""
        return self.wait(what, lambda d: next((attribute(e) for e in self.visible(xpath)), None), timeout)

    def click(self, what: str, xpath: str, timeout: float = 30) -> Any:
        """Click the first visible element the xpath finds (through JavaScript when something overlaps it).

        React may re-render the element between finding and clicking it (CI's Chromium did, on the Materialize
        button): a stale element is found again, until the timeout."""
        from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

        deadline = time.monotonic() + timeout
        while True:
            element = self.wait_visible(what, xpath, max(1.0, deadline - time.monotonic()))
            try:
                try:
                    element.click()
                except ElementClickInterceptedException:
                    self.driver.execute_script("arguments[0].click();", element)
                return element
            except StaleElementReferenceException:
                if time.monotonic() > deadline:
                    where = self.evidence(re.sub(r"\W+", "_", what).strip("_"))
                    raise AssertionError(f"{what} kept being re-rendered for {timeout:.0f} s: {where}") from None
                time.sleep(0.25)

    def text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText : '';") or ""

    def dismiss_community_modal(self, timeout: float = 6) -> bool:
        """Dagster shows "Join the Dagster community" once per instance, a second after the first page on localhost:
        Skip it (the UI then records it as seen, in the browser and on the server)."""
        dialog = "//*[contains(@class,'bp5-dialog') or @role='dialog'][.//*[contains(., 'Join the Dagster community')]]"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.visible(dialog):
                self.shot("community-modal")
                self.click("the community modal's Skip button", dialog + "//button[normalize-space(.)='Skip']")
                self.wait("the community modal closed", lambda d: not self.visible(dialog), 10)
                return True
            time.sleep(0.25)
        return False


def xpath_literal(text: str) -> str:
    """`text` as an XPath 1.0 string literal (it may hold quotes)."""
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return "concat(" + ', "\'", '.join(f"'{part}'" for part in text.split("'")) + ")"


@contextlib.contextmanager
def chromium(base_url: str, shots: Path, profile: Path) -> Iterator[Page]:
    """Headless Debian Chromium with a fresh profile under `profile`, closed (and its profile removed) after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    why = missing_browser()
    assert why is None, why
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile.mkdir(parents=True, exist_ok=True)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(shots / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        yield Page(driver, base_url, shots)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
