"""The report in a real browser: headless Chromium, driven over the DevTools protocol on a pipe.

Renders the report of a demo run (two variants compared) and of a real run (hostile module name, a finding, a non-finite
step), opens it in Debian's ``chromium`` and checks what a person would see:
every expected figure decoded and drawn (many distinct colours in its part of
a full-page screenshot), the hostile name shown as text, no script on the page,
no console error or exception, no dialog, and no request other than the file
itself and its ``data:`` images. Skips (with the reason) when chromium is absent.

``GRADWATCH_UPDATE_SCREENSHOT=1`` also refreshes ``docs/report.png`` (a compare report) and ``docs/report-layers.png``
(a 75-layer GPT-2).
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

import gradwatch as gw
from test_report import EXPECTED_FIGURES, HOSTILE, make_watch_run

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--hide-scrollbars", "--remote-debugging-pipe"]
WIDTH = 1000

pytestmark = [pytest.mark.browser, pytest.mark.slow]


class Chromium:
    """Headless Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_child, self._to = os.pipe()
        self._from, from_child = os.pipe()

        def move_pipes() -> None:  # in the child, before exec: our pipe ends become fds 3 and 4
            high_in = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)  # above 4, so dup2 cannot clobber them
            high_out = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        # close_fds=False: only fds 3 and 4 (made inheritable by dup2) reach chromium; Python's
        # own fds are non-inheritable (PEP 446).
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=move_pipes,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._from], [], [], left)
            if ready:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to)
        os.close(self._from)


def _distinct_colors(image: Any) -> int:
    return len(image.convert("RGB").getcolors(maxcolors=1 << 24) or [])


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    if CHROMIUM is None:
        if os.environ.get("GRADWATCH_REQUIRE_BROWSER") == "1":
            pytest.fail("GRADWATCH_REQUIRE_BROWSER=1 but no chromium on PATH")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    chromium = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        yield chromium
    finally:
        chromium.close()


def _render_and_check(browser: Chromium, page: Path) -> Any:
    """Open ``page``, check what a person sees (figures drawn, no script, errors or requests); return ``evaluate``."""
    from PIL import Image

    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": WIDTH, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
    browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")

    def evaluate(expression: str) -> Any:
        reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                  "awaitPromise": True}, session=session)
        assert "exceptionDetails" not in reply, reply
        return reply["result"]["value"]

    # Every image decoded before measuring (load fires after images, this makes it explicit).
    evaluate("Promise.all([...document.images].map(i => i.decode()))")
    figures = evaluate(
        "[...document.querySelectorAll('figure')].map(f => {const i = f.querySelector('img');"
        " const r = i.getBoundingClientRect();"
        " return {id: f.id, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,"
        " top: r.top + scrollY, left: r.left, width: r.width, height: r.height}})"
    )
    by_id = {f["id"]: f for f in figures}
    assert EXPECTED_FIGURES <= set(by_id), sorted(by_id)
    for fig in figures:
        assert fig["complete"] and fig["w"] > 300 and fig["h"] > 150, fig
    assert evaluate("document.scripts.length") == 0

    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
    image.load()
    assert image.width >= WIDTH - 20 and image.height > 3000
    assert _distinct_colors(image) > 1000
    for fig in figures:
        box = (int(fig["left"]), int(fig["top"]), int(fig["left"] + fig["width"]), int(fig["top"] + fig["height"]))
        crop = image.crop(box).convert("L")
        inked = sum(1 for v in crop.getdata() if v < 200) / (crop.width * crop.height)
        assert _distinct_colors(image.crop(box)) > 40 and inked > 0.01, (fig["id"], inked)

    problems = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in ("error", "warning", "assert"))
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") in ("error", "warning"))]
    assert problems == []
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), [u[:60] for u in requests]
    assert sum(url.startswith("data:image/svg+xml") for url in requests) >= len(EXPECTED_FIGURES)
    return evaluate


def test_report_renders_in_headless_chromium(tmp_path: Path, browser: Chromium) -> None:
    make_watch_run(tmp_path / "run", activation="sigmoid", steps=24, hostile=True, nan_step=15)
    evaluate = _render_and_check(browser, gw.report(tmp_path / "run").resolve())
    cells = evaluate("[...document.querySelectorAll('#layers td code')].map(c => c.textContent)")
    assert HOSTILE in cells  # the hostile module name is shown as text
    assert evaluate("document.body.innerText.includes('vanishing_gradients')")


def test_report_of_a_demo_run_renders_in_headless_chromium(tmp_path: Path, browser: Chromium) -> None:
    """The report a person makes after `gradwatch demo`: the vanishing sigmoid MLP against the healthy one."""
    pytest.importorskip("sklearn")
    from gradwatch.demo import run_demo

    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    runs = {v.name: v.run_dir for v in result.variants}
    page = gw.report(runs["sigmoid-default"], compare=runs["relu-kaiming-ln"], output=tmp_path / "demo.html")
    evaluate = _render_and_check(browser, page.resolve())
    assert evaluate("document.body.innerText.includes('vanishing_gradients')")


def test_report_with_precursor_signals_renders_in_headless_chromium(tmp_path: Path, browser: Chromium) -> None:
    """An AdamW run with attention and cross-entropy: the early-warning section's three charts are drawn too."""
    from test_precursor_outputs import train

    train(tmp_path / "run")
    evaluate = _render_and_check(browser, gw.report(tmp_path / "run").resolve())
    ids = evaluate("[...document.querySelectorAll('#precursors figure')].map(f => f.id)")
    assert ids == ["fig-adam-rms", "fig-attention-logits", "fig-log-z", "fig-output-rms"]
    assert evaluate("document.querySelector('#precursor-thresholds').nextElementSibling.innerText.includes('rms_threshold 3')")


def _open(browser: Chromium, page: Path, height: int = 900) -> str:
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    browser.send("Page.enable", session=session)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
    browser.send("Page.navigate", {"url": page.as_uri()}, session=session)
    browser.wait_for("Page.loadEventFired")
    return session


@pytest.mark.skipif(os.environ.get("GRADWATCH_UPDATE_SCREENSHOT") != "1", reason="set GRADWATCH_UPDATE_SCREENSHOT=1 to refresh docs/report.png")
def test_refresh_docs_screenshot(tmp_path: Path, browser: Chromium) -> None:
    """docs/report.png: the demo's sigmoid MLP (gradients vanish) against its ReLU + Kaiming + LayerNorm MLP."""
    pytest.importorskip("sklearn")
    from gradwatch.demo import run_demo

    result = run_demo(tmp_path / "demo", quick=True, progress=False)
    runs = {v.name: v.run_dir for v in result.variants}
    page = gw.report(runs["sigmoid-default"], compare=runs["relu-kaiming-ln"], output=tmp_path / "compare.html").resolve()
    _save_docs_shot(browser, page, "#charts", 8, 1500, "report.png")


def _save_docs_shot(browser: Chromium, page: Path, selector: str, above: int, height: int, name: str) -> None:
    """Save ``docs/<name>``: ``height`` pixels of ``page`` from ``above`` pixels over ``selector``."""
    from PIL import Image

    session = _open(browser, page)
    top = browser.send("Runtime.evaluate", {"expression": f"document.querySelector('{selector}').getBoundingClientRect().top",
                                             "returnByValue": True}, session=session)["result"]["value"]
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                   "clip": {"x": 0, "y": max(0, top - above), "width": WIDTH, "height": height, "scale": 1}},
                        session=session)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
    assert _distinct_colors(image) > 1000
    image.save(Path(__file__).resolve().parents[1] / "docs" / name, optimize=True)


@pytest.mark.skipif(os.environ.get("GRADWATCH_UPDATE_SCREENSHOT") != "1", reason="set GRADWATCH_UPDATE_SCREENSHOT=1 to refresh docs/report-layers.png")
def test_refresh_docs_layers_screenshot(tmp_path: Path, browser: Chromium) -> None:
    """docs/report-layers.png: the first charts of a 75-layer GPT-2's report (docs/report.md, "Many layers")."""
    pytest.importorskip("transformers")
    from test_report_layers import make_gpt2_run

    page = gw.report(make_gpt2_run(tmp_path / "gpt2", steps=30, n_embd=32)).resolve()
    _save_docs_shot(browser, page, "#fig-depth", 40, 860, "report-layers.png")


def test_notebook_html_reprs_render_in_headless_chromium(tmp_path: Path, browser: Chromium) -> None:
    """What a notebook shows for a Finding, a Probe, a Run and a Watch (each ``_repr_html_`` in an output cell)."""
    from torch import nn

    from test_report import HOSTILE_MESSAGE

    watch = make_watch_run(tmp_path / "run", activation="sigmoid", steps=24, hostile=True, nan_step=15)
    run = gw.load_run(tmp_path / "run")
    finding = next(f for f in run.findings if f.message == HOSTILE_MESSAGE)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    probe = gw.probe(model, (torch_randn(16, 4), torch_randn(16, 1)), loss_fn=nn.functional.mse_loss)
    cells = [finding._repr_html_(), probe._repr_html_(), run._repr_html_(), watch._repr_html_()]
    page = tmp_path / "notebook.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                    + "".join(f'<div class="output_html">{c}</div>' for c in cells) + "</body></html>", encoding="utf-8")
    session = _open(browser, page.resolve(), height=1200)
    for domain in ("Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable", session=session)
    browser.events.clear()  # load it again, now that console, log and network are watched
    browser.send("Page.reload", session=session)
    browser.wait_for("Page.loadEventFired")

    def evaluate(expression: str) -> Any:
        reply = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                             session=session)
        assert "exceptionDetails" not in reply, reply
        return reply["result"]["value"]

    evaluate("Promise.all([...document.images].map(i => i.decode()))")
    images = evaluate("[...document.images].map(i => ({w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))")
    assert len(images) == 2 and all(i["w"] > 300 and i["h"] > 150 and i["shown"] > 300 for i in images), images
    assert evaluate("document.scripts.length") == 0
    text = evaluate("document.body.innerText")
    assert HOSTILE in text and HOSTILE_MESSAGE in text  # the hostile names are text, not markup
    assert "vanishing_gradients" in text and "measured gain" in text and "skipped steps" in text
    assert evaluate("document.querySelectorAll('table').length") >= 6
    problems = [e for e in browser.events if e.get("method") in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
                or (e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") in ("error", "warning"))]
    assert problems == []
    requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), [u[:60] for u in requests]
    shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=session)
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
    assert _distinct_colors(image) > 500  # the charts are drawn, not blank


def torch_randn(*shape: int) -> Any:
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))
