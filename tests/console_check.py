"""Drives the operator's page (GET /admin/) in headless Chromium with
Selenium: signs in, finds the open window of MODEL with COUNT requests,
flushes it from its button, waits for its job, and reports every URL the
page asked for (Chromium's own network log and the page's resource
timings) and whether the page fits a narrow window, so the caller can check they all stay on carpool's origin.

Usage: console_check.py BASE_URL TOKEN MODEL COUNT [SCREENSHOT.png]
Prints one JSON object on stdout; exits non-zero with the reason when a
step does not happen within the wait.
"""

import json
import os
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 30


def find(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    sys.exit(f"none of {names} is installed (apt-get install chromium chromium-driver)")


def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = find("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(find("chromedriver")))


def network_urls(browser):
    """Every request Chromium sent for the page, from its DevTools log."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def main():
    base, token, model, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    screenshot = sys.argv[5] if len(sys.argv) > 5 else None
    os.environ.setdefault("SE_OFFLINE", "true")
    browser = driver()
    # The page redraws its tables on every refresh: an element found just
    # before one goes stale, and the step is simply tried again.
    wait = WebDriverWait(browser, WAIT, ignored_exceptions=[StaleElementReferenceException])
    out = {}
    try:
        browser.get(base + "/admin/")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "signin-button").click()
        wait.until(lambda b: b.find_element(By.ID, "console").is_displayed())
        out["token_in_url"] = token in browser.current_url
        out["token_in_session_storage"] = browser.execute_script(
            "return sessionStorage.getItem('carpool.admin_token')") == token
        out["token_in_local_storage"] = browser.execute_script(
            "return JSON.stringify(localStorage).indexOf(arguments[0]) >= 0", token)

        def window_row(b):
            return b.execute_script(
                """for (const row of document.querySelectorAll('#windows tbody tr')) {
                     const model = row.querySelector('td.model').textContent;
                     const count = row.querySelector('td.requests').dataset.count;
                     if (model === arguments[0] && count === arguments[1])
                       return {id: row.dataset.id, text: row.innerText};
                   }
                   return false;""", model, count)

        row = wait.until(window_row)
        window = row["id"]
        out["window"] = window
        out["window_text"] = row["text"]
        if screenshot:
            # Let every panel render once before the picture.
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#requests tbody tr"))
            wait.until(lambda b: b.find_element(By.ID, "savings").text.strip())
            browser.save_screenshot(screenshot)

        def flush(b):
            b.find_element(By.CSS_SELECTOR, f'#windows tr[data-id="{window}"] button.flush').click()
            return True

        wait.until(flush)

        def job_row(b):
            return b.execute_script(
                """const row = document.querySelector('#jobs tr[data-window="' + arguments[0] + '"]');
                   return row ? {state: row.dataset.state, text: row.innerText} : false;""", window)

        job = wait.until(job_row)
        out["job_state"] = job["state"]
        out["job_text"] = job["text"]
        wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, f'#windows tr[data-id="{window}"]'))
        out["savings_text"] = browser.find_element(By.ID, "savings").text
        out["requests_text"] = browser.find_element(By.ID, "requests").text
        # A narrow window: the page itself never scrolls sideways (wide
        # tables scroll inside their panel).
        browser.set_window_size(420, 900)
        out["narrow_overflow"] = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        out["narrow_width"] = browser.execute_script("return window.innerWidth")
        out["page_fetches"] = browser.execute_script("return window.carpoolRequests")
        out["resources"] = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        out["network"] = network_urls(browser)
        out["console_errors"] = [e["message"] for e in browser.get_log("browser")
                                 if e.get("level") == "SEVERE"]
    finally:
        browser.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
