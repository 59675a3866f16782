"""Screenshot the web UI's Compare view on this checkout's trained models: the README's docs/compare.png.

Reads:  the stage outputs the web UI reads (output/, SFT/sft_output/, RLHF/grpo_output/, RLHF/reward_model/), after
        `make all`. Writes: --out (default docs/compare.png).

Starts WebUI/app.py on a free local port, opens it in headless Chromium (Debian's chromium and chromium-driver, as
`make test` installs them), asks --prompt in the Compare tab, waits for the three scored answers and saves the page.

    python WebUI/screenshot_compare.py
    python WebUI/screenshot_compare.py --prompt "39加15等于多少？" --out /tmp/compare_zh.png
"""
import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llm_train.paths import REPO


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default="What is 29 + 82?", help="the question the three models answer")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "compare.png")
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        sys.exit("error: no chromium/chromedriver: apt-get install -y chromium chromium-driver")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    app = subprocess.Popen([sys.executable, str(REPO / "WebUI" / "app.py"), "--port", str(port)], cwd=REPO)
    try:
        for _ in range(240):  # the app loads four models first
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if app.poll() is not None:
                    sys.exit(f"error: WebUI/app.py stopped (exit {app.returncode})")
                time.sleep(0.5)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000"):
            options.add_argument(arg)
        browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        try:
            browser.get(url)
            wait = WebDriverWait(browser, 180, poll_frequency=0.2)
            tab = wait.until(lambda b: [t for t in b.find_elements(By.CSS_SELECTOR, "[role=tab]") if t.text == "Compare"])
            tab[0].click()
            box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#compare-input textarea"))
            box.clear()
            box.send_keys(args.prompt)
            browser.find_element(By.ID, "compare-go").click()
            wait.until(lambda b: all("reward-model score" in b.find_element(By.ID, f"verdict-{n}").text
                                     for n in ("base", "SFT", "GRPO")))
            browser.execute_script("document.getElementById('compare-input').scrollIntoView()")
            time.sleep(1)  # let the fonts settle
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
            for n in ("base", "SFT", "GRPO"):
                print(n, "|", browser.find_element(By.ID, f"verdict-{n}").text.replace("\n", " "))
        finally:
            browser.quit()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
