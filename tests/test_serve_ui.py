"""The live page (GET /ui) and the user history it shows (GET /v1/users/{user}): the routes through the
ASGI app, then the page itself in a real headless Chromium driving a real `recscore serve`.

The browser test needs Debian's Chromium and its driver (`apt-get install -y chromium chromium-driver`)
and the Python package selenium; without them it is skipped, unless RECSCORE_REQUIRE_BROWSER=1 (CI),
which makes their absence a failure. It leaves a screenshot in test-artifacts/ui.png.
"""
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from engine_data import build_small
from serve_data import serve
from test_serve_process import free_port, recscore, start

from recscore.serve.client import Client

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
REQUIRE_BROWSER = "RECSCORE_REQUIRE_BROWSER"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    return build_small(tmp_path_factory.mktemp("ui") / "b")


@pytest.fixture
def served(small_bundle, tmp_path):
    s = serve(shutil.copytree(small_bundle, tmp_path / "b"), tmp_path)
    yield s
    s.app.state.server.engine.close()


# ---- the routes -------------------------------------------------------------------------------------

def test_ui_is_served_without_a_key_with_a_strict_policy(served):
    r = served.client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script>" in r.text and "X-API-Key" in r.text and "sessionStorage" in r.text
    assert "innerHTML" not in r.text and "eval(" not in r.text
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert policy.count("'sha256-") == 2                 # the page's one script and one style, by hash
    assert r.headers["x-content-type-options"] == "nosniff"
    assert served.client.post("/ui").status_code == 405


def test_user_history_needs_a_read_key(served):
    r = served.client.get("/v1/users/3")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert served.client.get("/v1/users/3", headers={"X-API-Key": "x.y"}).status_code == 401
    for role in ("read", "write", "admin"):
        assert served.client.get("/v1/users/3", headers=served.headers(role)).status_code == 200


def test_user_history_is_newest_first_with_titles_and_feedback(served):
    h = served.headers("read")
    before = served.client.get("/v1/users/3", headers=h).json()
    assert set(before) == {"user", "total", "events"} and before["user"] == 3
    assert before["total"] > 0 and len(before["events"]) == min(20, before["total"])
    engine = served.app.state.server.engine
    for event in before["events"]:
        assert set(event) == {"item", "title", "value", "event", "ts"}
        assert event["event"] == "bundle" and event["title"] == engine.title(event["item"])
    times = [e["ts"] for e in before["events"]]
    assert times == sorted(times, reverse=True)
    events = [{"user": 3, "item": 1005, "value": 2.0, "ts": 5.0}, {"user": 3, "item": 1006, "event": "play"}]
    assert served.post("/v1/feedback", {"events": events}, "write").status_code == 200
    after = served.client.get("/v1/users/3?limit=2", headers=h).json()
    assert after["total"] == before["total"] + 2
    assert [(e["item"], e["event"]) for e in after["events"]] == [(1006, "play"), (1005, "click")]
    assert after["events"][1]["value"] == 2.0 and after["events"][1]["ts"] == 5.0
    assert after["events"][1]["title"] == engine.title(1005)
    fresh = served.post("/v1/feedback", {"events": [{"user": 123456, "item": 1007}]}, "write")
    assert fresh.status_code == 200
    only = served.client.get("/v1/users/123456", headers=h).json()
    assert only["total"] == 1 and only["events"][0]["item"] == 1007


def test_user_history_of_a_forgotten_user_keeps_only_later_feedback(served):
    engine = served.app.state.server.engine
    engine.forget_user(4)
    r = served.client.get("/v1/users/4", headers=served.headers("read"))
    assert r.status_code == 404 and r.json()["error"] == "unknown_user"
    served.post("/v1/feedback", {"events": [{"user": 4, "item": 1010}]}, "write")
    events = served.client.get("/v1/users/4", headers=served.headers("read")).json()["events"]
    assert [e["item"] for e in events] == [1010]


@pytest.mark.parametrize("path, status, code", [
    ("/v1/users/99999", 404, "unknown_user"),
    ("/v1/users/abc", 422, "invalid_request"),
    ("/v1/users/99999999999999999999", 422, "invalid_request"),
    ("/v1/users/3?limit=0", 422, "invalid_request"),
    ("/v1/users/3?limit=1001", 422, "invalid_request"),
    ("/v1/users/3?limit=x", 422, "invalid_request"),
])
def test_user_history_refusals_are_json(served, path, status, code):
    r = served.client.get(path, headers=served.headers("read"))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and isinstance(r.json()["detail"], str)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=st.text(max_size=30) | st.integers(-2 ** 70, 2 ** 70).map(str),
       limit=st.none() | st.text(max_size=12) | st.integers(-2 ** 70, 2 ** 70).map(str))
def test_user_history_never_500(served, user, limit):
    query = {} if limit is None else {"limit": limit}
    r = served.client.get("/v1/users/" + quote(user, safe=""), params=query, headers=served.headers("read"))
    assert r.status_code in (200, 404, 422), r.text
    assert r.status_code == 200 or set(r.json()) == {"error", "detail"}


def test_client_history(served):
    client = Client("http://unused")
    client._request = lambda method, path, body=None, query=None, parse=True: served.client.request(
        method, path, params=query, headers=served.headers("read")).json()
    assert client.history(3, limit=4) == served.client.get("/v1/users/3?limit=4", headers=served.headers("read")).json()


# ---- the page in a real browser -----------------------------------------------------------------------

def _absent(reason):
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(f"{reason} ({REQUIRE_BROWSER}=1 requires the browser test to run)")
    pytest.skip(f"{reason}; install it to run the browser test ({REQUIRE_BROWSER}=1 makes this a failure)")


@pytest.fixture
def chromium(tmp_path):
    """A headless Chromium under Selenium, from the system's chromium and chromedriver (nothing downloaded),
    with a fresh profile."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _absent("the Python package selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or next((p for p in ("/usr/bin/chromedriver",) if os.path.exists(p)), None)
    if not browser or not driver:
        _absent("Chromium or chromedriver is not installed (apt-get install -y chromium chromium-driver)")
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield browser
    browser.quit()


def test_live_page_in_headless_chromium(tmp_path, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = build_small(tmp_path / "b")
    token = subprocess.run(recscore("keys", "create", bundle, "--role", "write"), capture_output=True, text=True,
                           check=True).stdout.strip()
    port = free_port()
    process = start(bundle, port, tmp_path / "serve.log")
    browser = chromium
    wait = WebDriverWait(browser, 15)

    def items(selector):            # read in one script: the lists are re-rendered while the test waits
        return browser.execute_script("return Array.from(document.querySelectorAll(arguments[0]),"
                                      " (e) => Number(e.dataset.item))", selector)

    def recommended():
        return items("#recs button.item")

    def history():
        return items("#history li[data-item]")

    def text(element_id):
        return browser.find_element(By.ID, element_id).text

    try:
        browser.get(f"http://127.0.0.1:{port}/ui")
        assert browser.title == "recscore · live"
        user = browser.find_element(By.ID, "user")
        user.clear()
        user.send_keys("3")
        browser.find_element(By.ID, "show").click()        # no key yet: the server's refusal, shown as text
        wait.until(lambda _: "401 unauthorized" in text("status"))

        browser.find_element(By.ID, "key").send_keys(token)
        browser.find_element(By.ID, "show").click()
        wait.until(lambda _: len(recommended()) == 10 and history())
        api = Client(f"http://127.0.0.1:{port}", token, timeout=5)
        before = recommended()
        assert before == [r["item"] for r in api.recommend(3, k=10)["items"]]
        assert history() == [e["item"] for e in api.history(3, limit=15)["events"]]
        assert "history" in text("recs-meta") and "engine" in text("recs-meta")
        scores = browser.execute_script("return Array.from(document.querySelectorAll('#recs .score'),"
                                        " (e) => Number(e.textContent))")
        assert scores == sorted(scores, reverse=True)

        clicked = before[0]
        browser.find_element(By.CSS_SELECTOR, f'#recs button.item[data-item="{clicked}"]').click()
        wait.until(lambda _: clicked not in recommended() and history()[:1] == [clicked])
        after = recommended()
        assert len(after) == 10 and after == [r["item"] for r in api.recommend(3, k=10)["items"]]   # re-scored
        fresh = set(items("#recs li.fresh button.item"))
        assert fresh and fresh == set(after) - set(before)           # the newcomers are marked
        assert f"recorded a click on item {clicked}" in text("status")
        newest = api.history(3, limit=1)["events"][0]
        assert (newest["item"], newest["event"]) == (clicked, "click")

        browser.find_element(By.CSS_SELECTOR, "#recs button.why").click()   # this server has no LLM
        wait.until(lambda _: "501 feature_unavailable" in text("explanation"))
        assert "error" in browser.find_element(By.ID, "explanation").get_attribute("class")

        wait.until(lambda _: "POST /v1/feedback → 200" in text("log") and "engine requests" in text("metrics"))
        assert " ms" in text("log") and "mean recommend time" in text("metrics")
        assert browser.execute_script("return sessionStorage.getItem('recscore.key')") == token
        ARTIFACTS.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "ui.png"))
    finally:
        process.kill()
        process.wait()
    assert token.split(".")[1] not in (tmp_path / "serve.log").read_text()


def test_the_page_streams_an_explanation_as_text(served, chromium):
    """The explanation's server-sent events, read from a fetch body, appear piece by piece, as text."""
    import threading

    import uvicorn
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pieces = ["Because you ", "liked\nCold Cipher", " <b>and</b> &amp; more."]
    release = threading.Event()

    class LLM:
        def stream(self, prompt, max_new_tokens):
            yield pieces[0]
            release.wait(10)                    # the first piece shows before the rest is generated
            yield from pieces[1:]
    served.app.state.server.engine.llm = LLM()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(served.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait = WebDriverWait(chromium, 15)
        wait.until(lambda _: server.started)
        chromium.get(f"http://127.0.0.1:{port}/ui")
        chromium.find_element(By.ID, "key").send_keys(served.tokens["read"])
        chromium.find_element(By.ID, "show").click()
        wait.until(lambda _: chromium.find_elements(By.CSS_SELECTOR, "#recs button.why"))
        chromium.find_element(By.CSS_SELECTOR, "#recs button.why").click()
        explanation = chromium.find_element(By.ID, "explanation")
        wait.until(lambda _: explanation.get_property("textContent") == pieces[0])
        release.set()
        wait.until(lambda _: "first piece" in chromium.find_element(By.ID, "explain-meta").text)
        assert explanation.get_property("textContent") == "".join(pieces)     # the markup shown as text
        assert not chromium.find_elements(By.CSS_SELECTOR, "#explanation *")
        assert "cut short" not in chromium.find_element(By.ID, "explain-meta").text
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)
