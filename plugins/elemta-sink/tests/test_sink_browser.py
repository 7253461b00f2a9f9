"""The web UI in a real browser: Debian's headless Chromium driven by Selenium, mail sent by
swaks to a running Elemta, a loopback HTTP server counting the remote image's requests.

The browser steps are blocking calls, so they run in a thread while the server runs on the
test's event loop. Screenshots are saved under a temporary folder printed in the output.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


class CountingServer:
    """An HTTP server on loopback that counts every request (the 'remote' image host)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = bytes.fromhex(
                    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5f5f0b8"
                    "0000000049454e44ae426082")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CountingServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def html_message(subject: str, image_url: str) -> str:
    return (
        "From: Shop <shop@sender.example>\r\n"
        "To: dev@app.example\r\n"
        f"Subject: {subject}\r\n"
        "Authentication-Results: mx.upstream.example; spf=pass smtp.mailfrom=sender.example;"
        " dkim=fail (bad signature) header.d=sender.example\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello in plain text.\r\n"
        "--b1\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n"
        '<html><body><h1 id="greeting">Hello from the sink</h1>'
        f'<img id="pixel" src="{image_url}" width="20" height="20" alt="pixel">'
        "<script>document.title = 'script ran'; document.body.dataset.ran = 'yes';</script>"
        "</body></html>\r\n"
        "--b1--\r\n")


def swaks(port: int, subject: str, message: str, folder: Path) -> None:
    path = folder / f"{subject.replace(' ', '_')}.eml"
    path.write_text(message)
    done = subprocess.run(
        [shutil.which("swaks") or "swaks", "--server", "127.0.0.1", "--port", str(port),
         "--from", "shop@sender.example", "--to", "dev@app.example", "--data", str(path),
         "--timeout", "10"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,950", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser_tools(require_tool):
    require_tool("swaks")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            require_tool(path.rsplit("/", 1)[1], package)
    pytest.importorskip("selenium")


@pytest.fixture
def screenshots(capsys) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="elemta-sink-screenshots-"))
    with capsys.disabled():
        print(f"\nelemta-sink browser screenshots: {folder}")
    return folder


async def test_ui_shows_mail_live_blocks_remote_images_searches_and_deletes(
        browser_tools, sink_server, screenshots):
    sink = await sink_server()
    smtp_port = sink.smtp_port

    def in_browser(pixel: CountingServer) -> dict[str, object]:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        seen: dict[str, object] = {}
        driver = start_browser()
        wait = WebDriverWait(driver, 15)
        try:
            driver.get(sink.base + "/")
            wait.until(lambda d: "on" in d.find_element(By.ID, "live").get_attribute("class"))
            wait.until(ec.text_to_be_present_in_element((By.ID, "count"), "0 messages"))

            # a message sent now appears in the list without reloading the page
            swaks(smtp_port, "Welcome aboard", html_message(
                "Welcome aboard", f"http://127.0.0.1:{pixel.port}/pixel.png"), screenshots)
            row = wait.until(ec.presence_of_element_located(
                (By.XPATH, "//ul[@id='list']/li[contains(., 'Welcome aboard')]")))
            seen["navigations"] = driver.execute_script(
                "return performance.getEntriesByType('navigation').length")
            driver.save_screenshot(str(screenshots / "1-list.png"))

            row.click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "message-subject"),
                                                        "Welcome aboard"))
            frame = driver.find_element(By.ID, "html-frame")
            assert "allow-scripts" not in frame.get_attribute("sandbox")
            driver.switch_to.frame(frame)
            heading = wait.until(ec.presence_of_element_located((By.ID, "greeting")))
            seen["heading"] = heading.text
            seen["script_ran"] = driver.find_element(By.TAG_NAME, "body").get_attribute(
                "data-ran")
            seen["blocked_width"] = driver.execute_script(
                "return document.getElementById('pixel').naturalWidth")
            driver.switch_to.default_content()
            time.sleep(0.5)
            seen["requests_blocked"] = len(pixel.requests)
            driver.save_screenshot(str(screenshots / "2-html-remote-blocked.png"))

            # the toggle loads it: the count shows the block was the policy, not the network
            driver.find_element(By.ID, "remote-toggle").click()
            WebDriverWait(driver, 10).until(lambda d: pixel.requests)
            seen["requests_after_toggle"] = len(pixel.requests)
            driver.find_element(By.ID, "remote-toggle").click()

            driver.find_element(By.ID, "tab-text").click()
            seen["text"] = driver.find_element(By.ID, "text-body").text
            driver.find_element(By.ID, "tab-headers").click()
            seen["headers"] = driver.find_element(By.ID, "headers-table").text
            driver.find_element(By.ID, "tab-auth").click()
            seen["auth"] = driver.find_element(By.ID, "auth-results").text
            driver.save_screenshot(str(screenshots / "3-authentication-results.png"))
            driver.find_element(By.ID, "tab-raw").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "raw-body"), "Received:"))
            seen["raw"] = driver.find_element(By.ID, "raw-body").text

            # a second message, then a search that finds only it
            swaks(smtp_port, "Invoice 7", html_message(
                "Invoice 7", f"http://127.0.0.1:{pixel.port}/other.png"), screenshots)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 2)
            search = driver.find_element(By.ID, "search")
            search.send_keys("invoice")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 1)
            seen["search"] = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#list li")]
            driver.save_screenshot(str(screenshots / "4-search.png"))
            search.clear()
            search.send_keys(" ")
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 2)

            # delete the open message: it leaves the list and the view
            driver.find_element(By.XPATH,
                                "//ul[@id='list']/li[contains(., 'Welcome aboard')]").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "message-subject"),
                                                        "Welcome aboard"))
            driver.find_element(By.ID, "delete-btn").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#list li")) == 1)
            seen["after_delete"] = [li.text for li in
                                    driver.find_elements(By.CSS_SELECTOR, "#list li")]
            seen["pane_hidden"] = driver.find_element(By.ID, "message-pane").get_attribute(
                "hidden")
            driver.save_screenshot(str(screenshots / "5-deleted.png"))
            seen["console"] = [e for e in driver.get_log("browser")
                               if e.get("level") == "SEVERE" and "pixel" not in e["message"]
                               and "other.png" not in e["message"]]
        except Exception:
            driver.save_screenshot(str(screenshots / "failure.png"))
            raise
        finally:
            driver.quit()
        return seen

    with CountingServer() as pixel:
        seen = await asyncio.to_thread(in_browser, pixel)

    assert seen["navigations"] == 1                 # one page load: the list updated live
    assert seen["heading"] == "Hello from the sink"
    assert seen["script_ran"] is None               # the message's script never ran
    assert seen["blocked_width"] == 0
    assert seen["requests_blocked"] == 0            # the remote image was never fetched
    assert seen["requests_after_toggle"] >= 1
    assert "Hello in plain text." in seen["text"]
    assert "Subject Welcome aboard" in seen["headers"]
    assert "mx.upstream.example" in seen["auth"]
    assert "SPF pass" in seen["auth"] and "DKIM fail" in seen["auth"]
    assert "bad signature" in seen["auth"]
    assert "Subject: Welcome aboard" in seen["raw"]
    assert len(seen["search"]) == 1 and "Invoice 7" in seen["search"][0]
    assert len(seen["after_delete"]) == 1 and "Invoice 7" in seen["after_delete"][0]
    assert seen["pane_hidden"] is not None
    async with sink.client() as client:
        page = (await client.get("/api/v1/messages")).json()
    assert [m["subject"] for m in page["messages"]] == ["Invoice 7"]
    assert seen["console"] == [], seen["console"]
    assert sorted(p.name for p in screenshots.glob("[1-5]-*.png")) == [
        "1-list.png", "2-html-remote-blocked.png", "3-authentication-results.png",
        "4-search.png", "5-deleted.png"]


async def test_ui_behind_a_password_in_read_only_mode(browser_tools, sink_server, screenshots):
    from argon2 import PasswordHasher

    hashed = PasswordHasher(time_cost=1, memory_cost=8192).hash("let me in")
    sink = await sink_server(sink={"username": "dev", "password_hash": hashed,
                                   "read_only": True})
    host = sink.base.removeprefix("http://")

    def in_browser() -> dict[str, object]:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        seen: dict[str, object] = {}
        driver = start_browser()
        wait = WebDriverWait(driver, 15)
        try:
            driver.get(sink.base + "/")
            seen["without"] = driver.find_elements(By.ID, "list")    # the UI is not served
            driver.get(f"http://dev:let%20me%20in@{host}/")
            wait.until(lambda d: "on" in d.find_element(By.ID, "live").get_attribute("class"))
            swaks(sink.smtp_port, "Read only", html_message("Read only", "data:,"),
                  screenshots)
            wait.until(ec.presence_of_element_located(
                (By.XPATH, "//ul[@id='list']/li[contains(., 'Read only')]"))).click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "message-subject"),
                                                        "Read only"))
            driver.switch_to.frame(driver.find_element(By.ID, "html-frame"))
            seen["heading"] = wait.until(
                ec.presence_of_element_located((By.ID, "greeting"))).text
            driver.switch_to.default_content()
            seen["buttons"] = {b: driver.find_element(By.ID, b).is_displayed()
                               for b in ("delete-btn", "clear-btn", "release-btn")}
            driver.save_screenshot(str(screenshots / "6-read-only.png"))
        finally:
            driver.quit()
        return seen

    seen = await asyncio.to_thread(in_browser)
    assert seen["without"] == []
    assert seen["heading"] == "Hello from the sink"      # the frame loads behind the password
    assert seen["buttons"] == {"delete-btn": False, "clear-btn": False, "release-btn": False}
