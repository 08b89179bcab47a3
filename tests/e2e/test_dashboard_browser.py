"""The dashboard in a real headless Chromium (Debian's `chromium`, driven by the Playwright
client): see 3 live nodes, submit a job from the form and see its result, kill a node and
see it turn dead. Saves a screenshot and prints its path."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from tests.procs import Cluster, free_port, submit_many

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Where the screenshot goes (the README's docs/dashboard.png is one of these, copied).
SHOT_DIR = Path(os.environ.get("DASHBOARD_SHOT_DIR", "artifacts"))
# Browser waits, in ms: generous, the machine is shared.
WAIT = 20_000


def test_dashboard_in_chromium(cluster: Cluster) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: apt-get install chromium")
    dash = free_port()
    cluster.start_proxy(DASHBOARD_PORT=str(dash), NODE_TIMEOUT="2000")
    for name in ("node-1", "node-2", "node-3"):
        cluster.start_node(name, ALLOW_SHELL="1")
    # Some work to look at: 36 sleeps of 0.3 to 2.4 s on 12 slots keep a queue for a while.
    jobs = [f"sleep {300 + (i * 337) % 2100}" for i in range(36)] + ["fib 200"]
    for i, name in enumerate(("node-1", "node-2")):
        submit_many(cluster.nodes[name].port, jobs[i::2])

    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(WAIT)
            page.goto(f"http://127.0.0.1:{dash}/")
            page.wait_for_selector("#conn.on")
            page.wait_for_function(
                "document.querySelectorAll('#nodes tbody tr[data-state=alive]').length === 3")
            assert sorted(page.locator("#nodes tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.node)")) == ["node-1", "node-2", "node-3"]
            # a running job says for how long it has run (its node tells when it began)
            page.wait_for_function(
                "[...document.querySelectorAll('#jobs tbody tr[data-state=dispatched] td')]"
                r".some(td => /^\d+\.\d s…$/.test(td.textContent))")

            page.select_option("#job-type", "fib")
            page.fill("#job-args", "90")
            page.fill("#job-priority", "0")
            page.click("#submit-form button")
            ticket = page.locator("#submitted-ticket").text_content()
            assert ticket is not None and len(ticket) == 24
            row = page.locator(f"#jobs tbody tr[data-ticket='{ticket}']")
            row.wait_for()
            page.wait_for_function(
                f"document.querySelector(\"#jobs tr[data-ticket='{ticket}']\")"
                "?.dataset.state === 'done'")
            assert row.locator("td.result").text_content() == "2880067194370816120"
            row.click()
            page.wait_for_function(
                "document.querySelector('#detail-result')?.textContent === "
                "'2880067194370816120'")
            # the table is not redrawn under the pointer (a click there was lost, or
            # opened another job as rows moved), and says so
            page.locator("#jobs-paused").wait_for(state="visible")
            page.mouse.move(5, 5)
            page.locator("#jobs-paused").wait_for(state="hidden")
            # a double click on Submit submits one job (it made two)
            page.fill("#job-args", "91")
            page.dblclick("#submit-form button")
            page.wait_for_function(
                "[...document.querySelectorAll('#jobs tbody td.job')]"
                ".some(td => td.textContent === 'fib 91')")
            page.wait_for_timeout(1500)
            assert page.locator("#jobs tbody td.job", has_text="fib 91").count() == 1

            # An `sh` job's output, kept as one escaped line, shows as it was written in the
            # detail (in the table, one line).
            [sh] = submit_many(cluster.nodes["node-1"].port,
                               [r"sh printf 'one\ttab\ntwo \\n\n'"])
            sh_row = page.locator(f"#jobs tbody tr[data-ticket='{sh}']")
            sh_row.wait_for()
            page.wait_for_function(
                f"document.querySelector(\"#jobs tr[data-ticket='{sh}']\")"
                "?.dataset.state === 'done'")
            assert sh_row.locator("td.result").text_content() == r"exit 0: one\ttab\ntwo \\n"
            page.mouse.move(5, 5)
            sh_row.click()
            page.wait_for_function(
                "document.querySelector('#detail-result')?.textContent === "
                "'exit 0: one\\ttab\\ntwo \\\\n'")
            page.mouse.move(5, 5)

            cluster.nodes["node-3"].kill(signal.SIGKILL)
            page.wait_for_function(
                "document.querySelector('#nodes tr[data-node=\"node-3\"]')"
                "?.dataset.state === 'dead'")
            assert page.locator("#nodes tr[data-state=alive]").count() == 2
            # 20 results in: the typical job time is shown, and each node's mean
            page.wait_for_function(
                r"/^\d+\.\d+ m?s$/.test(document.querySelector('#typical-job').textContent)")
            mean = page.locator("#nodes tr[data-node='node-1'] td").nth(9).text_content()
            assert re.fullmatch(r"\d+\.\d+ m?s", mean or ""), mean
            assert page.locator("#store-alert").is_hidden()  # the proxy's store is fine
            assert page.locator("#nodes .why").count() == 0  # no node said why it left
            cluster.nodes["node-2"].kill(signal.SIGTERM)  # a node that stops says so
            why = page.locator("#nodes tr[data-node='node-2'] td.state .why")
            why.wait_for()
            assert why.text_content() == "left: stopping"
            page.wait_for_timeout(1500)  # let the chart take a few more samples
            page.evaluate("window.scrollTo(0, 0)")
            SHOT_DIR.mkdir(parents=True, exist_ok=True)
            shot = (SHOT_DIR / "dashboard.png").resolve()
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
