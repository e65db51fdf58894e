"""Runs launched as the UI launches them: `dagster dev` (webserver, daemon, queued run coordinator,
multiprocess executor), backfills through the webserver's GraphQL API (what the Backfill button calls),
the real embedded engine.

1. A run whose step loaded vLLM in its own process ends (before the engine was closed at the end of the
   step, the step process never exited and the run stayed STARTED).
2. With `synth-cpt serve` up, a backfill of every generation asset over all four partitions completes as one
   run per language (the single-run backfill policy), and the model is loaded once in total: by the server,
   none by the runs.
3. Then, on the same instance (`synth-cpt mix` and `synth-cpt evals` add the mixes and `eval_scores`), Debian's
   Chromium driven by Selenium sees what a user sees: every asset group of the Definitions in the asset graph,
   rewrites_medium's four materialized partitions and its passed checks, eval_scores's plot as a decoded image,
   and a materialization launched by clicking (Materialize -> partition picker -> Launch) that succeeds.
   Screenshots of every step go to $SYNTH_CPT_UI_SHOTS (`make test-ui`: .ui_screenshots/).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from . import browser as web
from .conftest import REPO, environ, short_prompt_library
from .dagster_dev import dagster_dev, free_port, launch_backfill, stop_gracefully, venv_bin

pytestmark = [pytest.mark.e2e, pytest.mark.vllm, pytest.mark.ui]

PARTITIONS = ["en|high", "en|low", "pt|high", "pt|low"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """An ingested instance with `dagster dev` on 127.0.0.1 (no model server yet)."""
    base = tmp_path_factory.mktemp("ui")
    dagster_home = base / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    config = base / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # the demo profile (`make demo`, `make ui`), with one document and one style per partition: the
                # backfill still materializes every generation asset of every partition, and CI stays short
                "extends": str(REPO / "synth_cpt" / "defaults" / "demo.yaml"),
                "synthesis": {"max_documents": 1, "routing": {"high": ["medium"], "low": ["medium"]}},
                # a small KV cache: the test session may hold another engine at the same time
                "generation": {"gpu_memory_utilization": 0.1},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_CPT_", "DAGSTER_"))}
    env.update(
        DAGSTER_HOME=str(dagster_home), SYNTH_CPT_HOME=str(base / "home"), SYNTH_CPT_CONFIG=str(config),
        SYNTH_CPT_MODELS=str(base / "models"), SYNTH_CPT_PROMPTS=str(short_prompt_library(base / "prompts")), COLUMNS="200",
    )  # fmt: skip
    ingest = subprocess.run([venv_bin("synth-cpt"), "ingest"], env=env, cwd=base, capture_output=True, text=True, timeout=900)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    with dagster_dev(env, base) as (dev, url, port):
        yield {"url": url, "env": env, "base": base, "dagster_home": dagster_home, "port": port, "pid": dev.pid}


def _runs(ui: dict, backfill_id: str):
    from dagster import RunsFilter

    with _instance(ui) as instance:
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        materialized = {}
        for run in runs:
            for record in instance.get_records_for_run(run.run_id, of_type=_materialization_type()).records:
                m = record.event_log_entry.asset_materialization
                materialized[(m.asset_key.to_user_string(), m.partition)] = {k: v.value for k, v in m.metadata.items()}
        return [(r.run_id, r.status.value) for r in runs], materialized


@contextlib.contextmanager
def _env(ui: dict):
    """This process with the test's DAGSTER_HOME and synth-cpt settings (the instance's dagster.yaml and the
    Definitions read them), restored after."""
    names = ("DAGSTER_HOME", "SYNTH_CPT_HOME", "SYNTH_CPT_CONFIG", "SYNTH_CPT_MODELS", "SYNTH_CPT_PROMPTS")
    with environ({k: ui["env"][k] for k in names}):
        yield


@contextlib.contextmanager
def _instance(ui: dict):
    """The test's instance, opened from this process."""
    from dagster import DagsterInstance

    with _env(ui), DagsterInstance.get() as instance:
        yield instance


def _materialization_type():
    from dagster import DagsterEventType

    return DagsterEventType.ASSET_MATERIALIZATION


def test_the_webserver_and_every_process_of_dagster_dev_listen_on_loopback_only(ui):
    """What `make ui` starts is reachable from this machine only: the webserver on 127.0.0.1, the code servers
    on unix sockets, the daemon on none."""
    import psutil

    dev = psutil.Process(ui["pid"])
    listening = sorted(
        (p.name(), c.laddr.ip, c.laddr.port)
        for p in [dev, *dev.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    )
    print(f"\nlistening: {listening}")
    assert [(ip, port) for _, ip, port in listening] == [("127.0.0.1", ui["port"])], listening


def test_a_daemon_run_with_vllm_in_its_step_process_ends(ui):
    """The in-process engine (no server up) through the daemon and the multiprocess executor: the run
    reaches SUCCESS, which it can only do once its step process has exited."""
    backfill_id, status = launch_backfill(ui["url"], ["rewrites_medium"], ["en|high"], timeout_s=900)
    runs, materialized = _runs(ui, backfill_id)
    assert [s for _, s in runs] == ["SUCCESS"], (status, runs, (ui["base"] / "dagster_dev.log").read_text()[-4000:])
    assert status.startswith("COMPLETED"), status
    meta = materialized[("rewrites_medium", "en|high")]
    assert meta["engine"] == "vllm" and meta["engine_loads"] == 1, meta


def test_a_backfill_of_every_generation_asset_over_all_partitions_loads_the_model_once(ui):
    from synth_cpt.defs.synthesis import ENTIGRAPH_PROMPTS  # noqa: F401  (the module defines the group)
    from synth_cpt.synthesis.prompts import load_kind

    assets = [f"rewrites_{s}" for s in load_kind("rewrite")] + ["entity_graphs", "entigraph_corpus"]
    port = free_port()
    serve_log = open(ui["base"] / "serve.out", "w")
    server = subprocess.Popen(
        [venv_bin("synth-cpt"), "serve", "--port", str(port)], env=ui["env"], cwd=ui["base"],
        stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        servers = ui["base"] / "models" / ".servers"
        deadline = time.monotonic() + 600
        record = None
        while record is None or record.get("state") != "ready":
            assert server.poll() is None and time.monotonic() < deadline, (ui["base"] / "serve.out").read_text()[-3000:]
            time.sleep(2)
            found = sorted(servers.glob("*.json")) if servers.is_dir() else []
            record = json.loads(found[0].read_text()) if found else None
        backfill_id, status = launch_backfill(ui["url"], assets, PARTITIONS, timeout_s=1800)
        runs, materialized = _runs(ui, backfill_id)
        # single_run: Dagster makes one range per value of a two-dimensional selection's smaller dimension (language
        # first on a tie), so the four partitions are two runs, each feeding all its assets and partitions at once
        assert status.startswith("COMPLETED") and [s for _, s in runs] == ["SUCCESS", "SUCCESS"], (status, runs)
        with _instance(ui) as instance:
            tags = [instance.get_run_by_id(run_id).tags for run_id, _ in runs]
        ranges = {(t["dagster/asset_partition_range_start"], t["dagster/asset_partition_range_end"]) for t in tags}
        assert ranges == {("pt|high", "pt|low"), ("en|high", "en|low")}, ranges
        assert set(materialized) == {(a, p) for a in assets for p in PARTITIONS}
        assert {m["engine_loads"] for m in materialized.values()} == {0}, "no run loads a model"
        engines = {m.get("engine") for m in materialized.values() if m.get("sent", 0)}
        assert engines == {"vllm-serve"}, engines  # every request sent went to the server
        assert server.poll() is None, "the server served the whole backfill"
        loads = Path(record["log"]).read_text().count("Loading weights took")
        assert loads == 1, f"model loads in the server's log: {loads}"
        print(
            f"backfill {backfill_id}: {len(runs)} runs {sorted(ranges)}, {len(materialized)} materializations, model loads: server {loads} + runs 0"
        )
    finally:
        stop_gracefully(server)
        serve_log.close()
    assert not list(servers.glob("*.json")), "the server's record goes with it"


# --- the UI in a real browser, on the instance the backfills above filled ---

GROUP_NODE = "//*[local-name()='foreignObject' and contains(@class,'group')]//*[@data-tooltip]"
FINAL_RUN_STATES = ("Success", "Failure", "Canceled")


def _definitions(ui: dict):
    """The asset graph of the Definitions `dagster dev` serves (built with the test's config)."""
    from synth_cpt.defs.definitions import build_definitions

    with _env(ui):
        return build_definitions().resolve_asset_graph()


def _png_size(data_uri: str) -> tuple[int, int]:
    """Width and height from a base64 PNG's IHDR chunk."""
    import base64
    import struct

    png = base64.b64decode(data_uri.split(",", 1)[1])
    return struct.unpack(">II", png[16:24])


@pytest.fixture(scope="module")
def outputs(ui):
    """The mixes and eval_scores of every partition, made by the CLI in the test's DAGSTER_HOME (what the browser
    checks read), on top of the backfills' generation assets."""
    from dagster import AssetKey

    with _instance(ui) as instance:
        generated = instance.get_materialized_partitions(AssetKey("rewrites_medium"))
    assert generated == set(PARTITIONS), f"the backfill tests above fill this instance: run the whole module ({generated})"
    for command in ("mix", "evals"):
        started = time.monotonic()
        done = subprocess.run([venv_bin("synth-cpt"), command], env=ui["env"], cwd=ui["base"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
        print(f"synth-cpt {command}: {time.monotonic() - started:.1f} s")
    return ui


@pytest.fixture(scope="module")
def page(outputs, tmp_path_factory):
    """Debian's Chromium on `dagster dev`, past the first-visit community modal; its screenshots are listed at the end."""
    why = web.missing_browser()
    if why:
        pytest.fail(why)  # never a skip: `make test-ui` installs them (`make browser`)
    shots = web.shots_dir()
    started = time.monotonic()
    with web.chromium(f"http://127.0.0.1:{outputs['port']}", shots, tmp_path_factory.mktemp("chromium_profile")) as tab:
        tab.open("/asset-groups")
        print(f"community modal dismissed: {tab.dismiss_community_modal()}")
        yield tab
    print(f"browser: {time.monotonic() - started:.1f} s, {len(tab.saved)} screenshots in {shots}:")
    for path in tab.saved:
        print(f"  {path}")


def _settled(page: web.Page, what: str, read, expected, timeout: float = 30):
    """Wait until `read()` (a value read from the page) equals `expected`; the value last read either way."""
    seen = []

    def equal(_driver) -> bool:
        seen.append(read())
        return seen[-1] == expected

    with contextlib.suppress(AssertionError):
        page.wait(what, equal, timeout)
    return seen[-1] if seen else read()


def _lines(page: web.Page) -> list[str]:
    return [line.strip() for line in page.text().splitlines() if line.strip()]


def test_the_asset_graph_shows_every_asset_group_of_the_definitions(ui, page):
    graph = _definitions(ui)
    expected = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    page.open("/asset-groups")

    def shown() -> set[str]:
        return {e.get_attribute("data-tooltip") for e in page.visible(GROUP_NODE)}

    groups = _settled(page, "every asset group in the graph", shown, expected)
    page.wait("the groups' statuses", lambda d: "fetching statuses" not in page.text())
    time.sleep(1)  # the graph's zoom-to-fit animation
    shot = page.shot("asset-graph-groups")
    print(f"asset groups in the graph: {sorted(groups)} (Definitions: {sorted(expected)})")
    assert groups == expected, f"graph shows {sorted(groups)}: {page.evidence('asset_graph_groups')}"
    _readme_graph(page, shot)


def _readme_graph(page: web.Page, shot: Path) -> None:
    """The graph cut out of a screenshot, small enough for the README (saved as asset-graph.png;
    docs/asset-graph.png is one of these)."""
    from PIL import Image

    # the box around every node of the graph, with a margin
    canvas = page.driver.execute_script(
        "const rs = [...document.querySelectorAll('foreignObject')].map(f => f.getBoundingClientRect()).filter(r => r.width > 0);"
        "return [Math.max(0, Math.min(...rs.map(r => r.left)) - 16), Math.max(0, Math.min(...rs.map(r => r.top)) - 16),"
        "  Math.max(...rs.map(r => r.right)) + 16, Math.max(...rs.map(r => r.bottom)) + 16, devicePixelRatio];"
    )
    left, top, right, bottom, ratio = canvas
    out = page.shots / "asset-graph.png"
    with Image.open(shot) as image:
        crop = image.crop(tuple(int(v * ratio) for v in (left, top, min(right, image.width), min(bottom, image.height))))
        crop.thumbnail((1200, 1200))
        crop.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(out, optimize=True)
    print(f"README candidate: {out} ({out.stat().st_size // 1024} KB)")


def test_rewrites_medium_shows_its_four_partitions_materialized(ui, page):
    import re

    from dagster import AssetKey

    with _instance(ui) as instance:
        recorded = instance.get_materialized_partitions(AssetKey("rewrites_medium"))
    page.open("/assets/rewrites_medium?view=partitions")

    def counts() -> dict[str, int]:
        return {m[1]: int(m[2]) for m in re.finditer(r"^(Materialized|Failed|Missing) \((\d+)\)$", page.text(), re.M)}

    expected = {"Materialized": len(PARTITIONS), "Failed": 0, "Missing": 0}
    shown = _settled(page, "rewrites_medium's partition counts", counts, expected)
    page.shot("rewrites_medium-partitions")
    print(f"rewrites_medium partitions in the UI: {shown}; in the instance: {sorted(recorded)}")
    assert shown == expected, f"UI {shown}: {page.evidence('rewrites_medium_partitions')}"
    assert len(recorded) == shown["Materialized"], (sorted(recorded), shown)


def test_rewrites_medium_shows_its_checks_succeeded_and_the_latest_passed(ui, page):
    from dagster import AssetKey

    graph = _definitions(ui)
    checks = sorted(c.name for c in graph.get(AssetKey("rewrites_medium")).check_keys)
    with _instance(ui) as instance:
        recorded = {
            c.name: instance.event_log_storage.get_asset_check_execution_history(c, limit=1)[0].status.value
            for c in graph.get(AssetKey("rewrites_medium")).check_keys
        }
    page.open("/assets/rewrites_medium?view=checks")

    def listed() -> dict[str, str]:
        lines, found = _lines(page), {}
        for name in checks:
            after = [line for line in lines[lines.index(name) :] if line != name] if name in lines else []
            found[name] = after[0] if after else ""
        return found

    statuses = _settled(page, "rewrites_medium's checks", listed, dict.fromkeys(checks, "Succeeded"))
    page.click(f"the check {checks[0]}", f"//*[normalize-space(text())={web.xpath_literal(checks[0])}]")
    page.wait_visible("the check's latest execution", "//*[normalize-space(text())='Evaluation result']")

    def result() -> str:
        lines = _lines(page)
        return lines[lines.index("Evaluation result") + 1] if "Evaluation result" in lines else ""

    latest = _settled(page, f"the evaluation result of {checks[0]}", result, "Passed")
    page.shot(f"rewrites_medium-check-{checks[0]}")
    print(f"rewrites_medium checks in the UI: {statuses}, latest {checks[0]}: {latest}; in the instance: {recorded}")
    assert statuses == dict.fromkeys(checks, "Succeeded"), f"UI {statuses}: {page.evidence('rewrites_medium_checks')}"
    assert latest == "Passed", f"UI {latest!r}: {page.evidence('rewrites_medium_check_result')}"
    assert recorded == dict.fromkeys(checks, "SUCCEEDED")


def test_eval_scores_shows_its_plot_as_an_image(ui, page):
    from dagster import AssetKey

    plot = "quality_score_by_origin"
    with _instance(ui) as instance:
        records = instance.fetch_materializations(AssetKey("eval_scores"), limit=len(PARTITIONS)).records
    uris = {r.asset_materialization.metadata[plot].value.split("](", 1)[1].rstrip(")") for r in records}
    page.open("/assets/eval_scores?view=events")
    row = f"//tr[td[normalize-space(.)={web.xpath_literal(plot)}]]"
    page.click(f"[Show Markdown] of {plot}", f"{row}//a[normalize-space(.)='[Show Markdown]']")
    dialog_image = "//*[@role='dialog' or contains(@class,'bp5-dialog')]//img"

    def decoded(image) -> tuple | None:
        """src, width and height once the image is decoded, read in one poll (a re-render only means another)."""
        complete, width, height = page.driver.execute_script(
            "return [arguments[0].complete, arguments[0].naturalWidth, arguments[0].naturalHeight]", image
        )
        return (image.get_attribute("src"), width, height) if complete and width > 0 else None

    src, width, height = page.read(f"the plot {plot} decoded", dialog_image, decoded, 30)
    page.shot("eval_scores-plot")
    print(f"eval_scores {plot}: a {width}x{height} image; its src is one of the latest materializations' plots: {src in uris}")
    assert src in uris, f"the image is not the metadata's plot: {page.evidence('eval_scores_plot')}"
    assert width > 0 and (width, height) == _png_size(src), f"{width}x{height}: {page.evidence('eval_scores_plot')}"


def test_a_materialization_launched_by_clicking_succeeds(ui, page):
    from dagster import AssetKey

    asset, partition = "quality_subsets", PARTITIONS[0]  # no model: the run is cheap
    parts = _definitions(ui).get(AssetKey(asset)).partitions_def
    by_dimension = parts.get_partition_key_from_str(partition).keys_by_dimension
    page.open(f"/assets/{asset}?view=partitions")
    page.click("the Materialize button", "//button[starts-with(normalize-space(.),'Materialize')]")
    title = f"//*[normalize-space(text())='Launch runs to materialize {asset}']"
    page.wait_visible("the launch dialog", title)
    for dimension, key in by_dimension.items():
        picker = f"//span[normalize-space(.)={web.xpath_literal(dimension)}]/ancestor::div[.//*[@aria-haspopup='dialog']][1]"
        page.click(f"the {dimension} picker", f"{picker}//*[@aria-haspopup='dialog']")
        page.click(f"{dimension} {key}", f"//*[@role='menuitem'][.//*[@title={web.xpath_literal(key)}]]")
        page.click("the dialog's title (closes the picker)", title)
    page.shot(f"{asset}-launch-dialog")
    page.click("the Launch 1 run button", "//button[normalize-space(.)='Launch 1 run']")
    href = page.read(
        "the launched run's link", "//a[contains(@href,'/runs/')][normalize-space(.)='View']", lambda e: e.get_attribute("href")
    )
    run_id = href.rsplit("/runs/", 1)[1].split("?")[0]
    started = time.monotonic()
    page.open(f"/runs/{run_id}")
    final = " or ".join(f"normalize-space(text())='{s}'" for s in FINAL_RUN_STATES)
    state = page.read(f"run {run_id} finished", f"//*[{final}]", lambda e: e.text.strip(), timeout=240)
    page.shot(f"{asset}-run")
    with _instance(ui) as instance:
        run = instance.get_run_by_id(run_id)
        records = instance.get_records_for_run(run_id, of_type=_materialization_type()).records
    made = {
        (r.event_log_entry.asset_materialization.asset_key.to_user_string(), r.event_log_entry.asset_materialization.partition)
        for r in records
    }
    print(
        f"run {run_id} launched by clicking: the UI shows {state} after {time.monotonic() - started:.1f} s; instance: {run.status.value}, {made}"
    )
    assert state == "Success", f"run {run_id}: {state}: {page.evidence('launched_run')}"
    assert run.status.value == "SUCCESS" and run.tags.get("dagster/partition") == partition
    assert made == {(asset, partition)}
