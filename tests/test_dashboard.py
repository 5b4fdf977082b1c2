"""The operations view: its JSON core, its HTTP server, and the page in a real browser.

The browser test drives Debian's chromium headless through chromedriver (selenium),
against a real simulated network (BB84 links, relay, mTLS KMEs) on loopback; it
checks the map, the link table, the live updates, that switching an eavesdropper on
turns its link red within a second, and it saves the screenshot docs/dashboard.md shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from qcall.dashboard.server import DashboardServer, parse_listen
from qcall.dashboard.view import DashboardView, layout
from qcall.exceptions import ConfigError, QCallError
from qcall.qkd.client import open_key_source
from qcall.qkd.topology import load_topology
from tests.test_network import TIMEOUT, fast_network

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "dashboard.png"


def test_layout_is_deterministic_and_inside_the_unit_square() -> None:
    topo = load_topology("hefei-metro")
    pos = layout(topo)
    assert pos == layout(topo) and set(pos) == set(topo.nodes)
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in pos.values())
    assert len(set(pos.values())) == len(pos)  # no two nodes on one spot


def test_view_colours_alarms_and_active_calls() -> None:
    topo = load_topology("beijing-hefei")
    view = DashboardView(topo)
    names = list(topo.links)
    links = {n: {"active": True, "available_bits": 100, "state": "OK", "qber": 0.01} for n in names}
    route = ["Beijing", *[link.b for link in topo.links.values()]]
    pair = {"master": "alice", "slave": "bob", "stored_keys": 4, "delivered": 4, "route": route}
    snap = view.snapshot({"links": links, "pairs": [pair]}, now=0.0)
    assert {v["colour"] for v in snap["links"].values()} == {"green"} and not snap["calls"]
    links[names[1]] = {**links[names[1]], "eve_fraction": 1.0}
    snap = view.snapshot({"links": links, "pairs": [{**pair, "stored_keys": 3}]}, now=1.0)
    assert snap["links"][names[1]]["colour"] == "red"
    assert any("eavesdropper switched on" in a for a in snap["alarms"])
    (call,) = snap["calls"]  # the pool shrank: a call is drawing key
    assert call["route"] == route
    snap = view.snapshot({"links": links, "pairs": [{**pair, "stored_keys": 3}]}, now=20.0)
    assert not snap["calls"]  # idle for longer than the window


def test_parse_listen() -> None:
    assert parse_listen(":8080") == ("127.0.0.1", 8080)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    for bad in ("8080", "host:", ":99999", ":x"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def _request(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_http_api_and_bad_requests(tmp_path: Path) -> None:
    async with fast_network("beijing-hefei", tmp_path / "s") as net:
        async with DashboardServer(net, "127.0.0.1", 0) as board:

            def get(path: str, data: bytes | None = None) -> Awaitable[tuple[int, bytes]]:
                return asyncio.to_thread(_request, board.url + path, data)

            status, body = await get("api/topology")
            assert status == 200 and len(json.loads(body)["links"]) == len(net.topology.links)
            status, body = await get("")
            assert status == 200 and b"<svg" in body and b"http" not in body.split(b"<body>")[1]
            assert (await get("nope"))[0] == 404
            assert (await get("api/eve"))[0] == 405
            assert (await get("api/eve", b"{not json"))[0] == 400
            status, body = await get("api/eve", b'{"link": "Mars-Venus"}')
            assert status == 400 and b"Mars-Venus" in body
            status, _ = await get("api/eve", b'{"link": "Jinan-Taian", "fraction": 1}')
            assert status == 200
            status, body = await get("api/status")
            assert json.loads(body)["links"]["Jinan-Taian"]["colour"] == "red"


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (run.sh installs them for tests)",
)
async def test_dashboard_in_chromium(tmp_path: Path) -> None:
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By

    async with fast_network("beijing-hefei", tmp_path / "s", pool_target=2) as net:
        await net.wait_ready(TIMEOUT)
        async with DashboardServer(net, "127.0.0.1", 0) as board:
            driver = await asyncio.to_thread(_driver)
            try:
                await asyncio.to_thread(driver.get, board.url)

                def colour(link: str) -> str:
                    return str(
                        driver.find_element(By.ID, f"link-{link}").get_attribute("data-colour")
                    )

                async def until(check: Any, timeout: float) -> float:
                    start = time.monotonic()
                    while not await asyncio.to_thread(check):
                        assert time.monotonic() - start < timeout, "page did not update"
                        await asyncio.sleep(0.05)
                    return time.monotonic() - start

                await until(lambda: colour("Jinan-Taian") == "green", 10)
                lines = await asyncio.to_thread(
                    driver.find_elements, By.CSS_SELECTOR, "#links line"
                )
                assert len(lines) == len(net.topology.links)
                rows = await asyncio.to_thread(
                    driver.find_elements, By.CSS_SELECTOR, "#link-table tbody tr"
                )
                assert len(rows) == len(net.topology.links)
                assert (
                    await asyncio.to_thread(lambda: driver.find_element(By.ID, "topology").text)
                    == "beijing-hefei"
                )
                # A call draws key: it shows with its route.
                async with open_key_source(net.sae_credentials("alice").as_config()) as kme:
                    await kme.get_key("bob")
                await until(lambda: "alice → bob" in driver.find_element(By.ID, "calls").text, 5)
                await until(lambda: driver.find_elements(By.CSS_SELECTOR, "#routes polyline"), 5)

                # The operator switches an eavesdropper on from the page: red within a second.
                def switch_on() -> None:
                    driver.find_element(
                        By.CSS_SELECTOR, "#eve-link option[value='Jinan-Taian']"
                    ).click()
                    driver.find_element(By.ID, "eve-on").click()

                await asyncio.to_thread(switch_on)
                took = await until(lambda: colour("Jinan-Taian") == "red", 1.0)
                assert took < 1.0
                await until(lambda: "Jinan-Taian" in driver.find_element(By.ID, "alarms").text, 2)
                # ... and the QBER alarm follows once the link's next block is checked. A link
                # whose buffers are full idles: keep drawing key so that it runs again.
                async def draw() -> None:
                    async with open_key_source(net.sae_credentials("alice").as_config()) as src:
                        while True:
                            with contextlib.suppress(QCallError):
                                await src.get_key("bob")
                            await asyncio.sleep(0.2)

                drawing = asyncio.ensure_future(draw())
                try:
                    await until(
                        lambda: "above threshold" in driver.find_element(By.ID, "alarms").text,
                        TIMEOUT,
                    )
                finally:
                    drawing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await drawing
                assert colour("Beijing-Langfang") == "green"
                await asyncio.to_thread(driver.save_screenshot, str(tmp_path / "dashboard.png"))
                assert (tmp_path / "dashboard.png").stat().st_size > 10_000
                if SCREENSHOT.parent.is_dir():
                    shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)
            finally:
                await asyncio.to_thread(driver.quit)


def test_cli_rejects_a_bad_dashboard_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qcall.cli import main

    args = ["network", "--state", str(tmp_path), "--duration", "1", "--dashboard", "8080"]
    assert main(args) == 1
    assert "expected [HOST]:PORT" in capsys.readouterr().err
    assert not (tmp_path / "network.json").exists()  # failed before anything started
