"""Drives the web console in headless Chromium (Debian's chromium + chromium-driver, through the
`selenium` package): loads the page, connects with a tenant key, sends a prompt with the keyboard
and sees its tokens arrive one piece after another, reads the request's facts and the live view,
checks every control is labelled and usable by keyboard, and that a narrow (phone) screen needs no
horizontal scrolling. Saves screenshots. Run by tests/console.rs:

    python console_browser.py BASE_URL KEY MODEL SCREENSHOT_DIR
"""
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

BASE, KEY, MODEL, SHOTS = sys.argv[1:5]


def wait(what, predicate, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def browser():
    opts = webdriver.ChromeOptions()
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,1000"]:
        opts.add_argument(a)
    binary = next((p for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] if os.path.exists(p)), None)
    if binary:
        opts.binary_location = binary
    # The packaged driver: selenium must not try to download one (there is no network).
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def main():
    d = browser()
    try:
        d.get(BASE + "/")
        assert d.title == "Hearth console", d.title
        # Every form control has a label a screen reader reads.
        unlabelled = d.execute_script(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.id)")
        assert unlabelled == [], unlabelled

        # Without a key the feed and the API refuse; with the tenant's key the models appear.
        wait("the refusal", lambda: "refused" in d.find_element(By.ID, "conn").text)
        key = d.find_element(By.ID, "api-key")
        key.send_keys(KEY, Keys.ENTER)
        wait("connected", lambda: d.find_element(By.ID, "conn").text == "connected")
        options = [o.get_attribute("value") for o in d.find_elements(By.CSS_SELECTOR, "#model option")]
        assert MODEL in options, options

        # Keyboard only: Tab from the key field reaches the model picker and then the message box.
        d.find_element(By.ID, "api-key").click()
        order = []
        for _ in range(4):
            d.switch_to.active_element.send_keys(Keys.TAB)
            order.append(d.switch_to.active_element.get_attribute("id"))
        assert order == ["connect", "model", "system", "prompt"], order
        prompt = d.switch_to.active_element
        d.execute_script("document.getElementById('max_tokens').value = 48;"
                         "document.getElementById('temperature').value = 0;")
        prompt.send_keys("Write a short story about a lighthouse keeper.")
        # Ctrl+Enter sends; the reply grows piece by piece while the stream runs.
        lengths = []
        prompt.send_keys(Keys.CONTROL, Keys.ENTER)
        out = d.find_element(By.ID, "output")
        t0 = time.time()
        while time.time() - t0 < 120:
            n = len(out.text)
            if not lengths or lengths[-1] != n:
                lengths.append(n)
            if d.find_element(By.ID, "send").is_enabled() and n > 0:
                break
            time.sleep(0.02)
        assert len(lengths) >= 3 and lengths[-1] > 0, f"tokens did not arrive one by one: {lengths}"
        facts = d.find_element(By.ID, "facts").text
        for want in ["device time", "tokens", "mean logprob", "speed"]:
            assert want in facts, facts
        err = d.find_element(By.ID, "ask-error").text
        assert err == "", err
        d.find_element(By.CSS_SELECTOR, "#snippets summary").click()
        curl = d.find_element(By.ID, "curl").text
        assert "/v1/chat/completions" in curl and "$HEARTH_API_KEY" in curl and KEY not in curl, curl
        assert "lighthouse keeper" in curl
        assert "OpenAI(" in d.find_element(By.ID, "python").text

        # The live view: the model's row and this tenant's usage today, refreshed without a reload.
        wait("the model row", lambda: MODEL in d.find_element(By.ID, "models-table").text)
        wait("today's usage", lambda: "console-team" in d.find_element(By.ID, "usage-table").text, 20)
        first = d.find_element(By.ID, "live-state").text
        wait("a later snapshot", lambda: d.find_element(By.ID, "live-state").text != first, 10)
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(os.path.join(SHOTS, "console.png"))

        # A refused request shows its error in the playground and in the live view.
        # (A value the form accepts and the server refuses: more tokens than the context holds.)
        d.execute_script("document.getElementById('max_tokens').value = 1000000;")
        d.find_element(By.ID, "send").click()
        wait("the error", lambda: d.find_element(By.ID, "ask-error").text)
        wait("the error in the live view", lambda: "400" in d.find_element(By.ID, "errors-table").text, 10)

        # A phone-sized screen: one column, nothing wider than the screen.
        d.set_window_size(390, 844)
        time.sleep(0.5)
        wide = d.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert wide[0] <= wide[1], f"horizontal overflow at 390 px: {wide}"
        d.save_screenshot(os.path.join(SHOTS, "console-narrow.png"))
        print("console ok")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
