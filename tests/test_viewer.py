"""The sweep viewer (report.html) in real headless Chromium, driven by Playwright with the system's Chromium.

Every page is opened from file:// with every request intercepted: the tests fail when any request leaves the
report's folder (anything but file:// under it, or data:). Skipped, with the reason, without chromium or playwright.
"""

import shlex
import shutil
import statistics
import time

import numpy as np
import pytest

from tests.conftest import read_png, run_cli
from tests.test_report import data_rows, report_data

pytestmark = pytest.mark.slow  # a browser on the report of a sweep made through the CLI
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[dev]')")
    if CHROMIUM is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)  # `playwright install` cannot download here
        yield browser
        browser.close()


def new_page(browser):
    return browser.new_page(viewport={"width": 1400, "height": 1000})


@pytest.fixture(scope="module")
def tab(browser):
    """One page that the tests load their reports into, each as a new document (nothing carries over): a page that
    has loaded a report loads the next in about a third of the time a new page takes (its renderer is warm)."""
    page = new_page(browser)
    yield page
    page.close()


class Viewer:
    """A report loaded into `page` as a new document; `outside` lists every request that left the report's folder."""

    def __init__(self, page, html):
        self.html, self.data = html, report_data(html)
        self.rows = data_rows(self.data)
        self.page, self.folder, self.requests, self.errors = page, html.parent.as_uri() + "/", [], []
        # a new navigation, never a reload of the last test's document (a reload restores its form values)
        page.goto("about:blank")
        page.route("**/*", self.intercept)
        page.on("pageerror", self.error)
        page.goto(html.as_uri())

    def error(self, error):
        self.errors.append(str(error))

    def intercept(self, route):
        url = route.request.url
        self.requests.append(url)
        if url.startswith(self.folder) or url.startswith("data:"):
            route.continue_()
        else:
            route.abort()

    @property
    def outside(self) -> list[str]:
        return [u for u in self.requests if not (u.startswith(self.folder) or u.startswith("data:"))]

    def cells(self) -> list[dict]:
        """Every grid cell drawn: its row (a dict), its image's source and size once loaded, its labels."""
        self.page.wait_for_function(
            "[...document.querySelectorAll('#grid td.cell img')].every(i => i.complete && i.src)")
        found = self.page.evaluate("""[...document.querySelectorAll('#grid td.cell')].map(td => {
            const img = td.querySelector('img'), table = td.closest('table'), tr = td.closest('tr');
            return {row: td.dataset.row === undefined ? null : Number(td.dataset.row),
                    src: img ? img.src : null, width: img ? img.naturalWidth : 0,
                    x: table.querySelectorAll('th.xlabel')[td.cellIndex - 1]?.textContent ?? null,
                    y: tr.querySelector('th.ylabel').textContent,
                    page: td.closest('section').querySelector('h3')?.textContent ?? null}; })""")
        for cell in found:
            cell["values"] = self.rows[cell["row"]] if cell["row"] is not None else None
        return found

    def cell(self, **values):
        """The grid cell whose row has these values."""
        for n, cell in enumerate(self.cells()):
            if cell["values"] and all(cell["values"][k] == v for k, v in values.items()):
                return self.page.locator("#grid td.cell").nth(n), cell
        raise AssertionError(f"no cell with {values}")

    def close(self):
        """Lets go of the page (the next test loads its report into it), then checks what this one saw."""
        self.page.unroute("**/*")
        self.page.remove_listener("pageerror", self.error)
        assert self.errors == [] and self.outside == []


@pytest.fixture(scope="module")
def report(small_sweep, tmp_path_factory):
    """The viewer of a copy of the shared real sweep: scheduler=ddim,euler_a steps=2,4 seed=[0,1] on digits-sd."""
    from runner import results
    from runner.report import write_report

    sweep = tmp_path_factory.mktemp("viewer") / "sweep"
    shutil.copytree(small_sweep, sweep)
    return write_report(results.load(sweep), sweep / "report")


@pytest.fixture
def viewer(tab, report):
    opened = Viewer(tab, report)
    yield opened
    opened.close()


def test_grid_draws_every_image_with_its_labels(viewer):
    cells = viewer.cells()
    assert len(cells) == 8  # scheduler across, steps down, one page per seed
    for cell in cells:
        values, image = cell["values"], viewer.data["images"][cell["row"]]
        assert cell["src"] == image["thumb"] and cell["width"] == 32  # the row's own embedded PNG, rendered
        assert (cell["x"], cell["y"], cell["page"]) == (values["scheduler"], str(values["steps"]),
                                                        f"seed = {values['seed']}")
    page = viewer.page
    assert page.locator(".page h3").all_text_contents() == ["seed = 0", "seed = 1"]
    assert page.locator(".page >> nth=0 >> th.xlabel").all_text_contents() == ["ddim", "euler_a"]  # as typed
    assert page.locator(".page >> nth=0 >> th.ylabel").all_text_contents() == ["2", "4"]
    # the value under each image is its prompt_adherence; the best of each row is marked
    caption = page.locator("#grid td.cell >> nth=0 >> .cap").text_content()
    assert caption.lstrip("★ ") == f"{cells[0]['values']['prompt_adherence']:.3f}"


def test_switch_axes_and_set_a_filter(viewer):
    page = viewer.page
    page.select_option("#axis-page", "")  # seed off the pages: it becomes a filter
    seed_filter = page.locator("#filters .filter[data-axis=seed] button")
    assert seed_filter.all_text_contents() == ["0", "1"]
    assert page.locator("#filters button.active").text_content() == "0"
    cells = viewer.cells()
    assert len(cells) == 4 and {c["values"]["seed"] for c in cells} == {0}
    seed_filter.nth(1).click()
    cells = viewer.cells()
    assert len(cells) == 4 and {c["values"]["seed"] for c in cells} == {1}
    assert all(c["src"] == viewer.data["images"][c["row"]]["thumb"] for c in cells)  # redrawn in place
    page.select_option("#axis-x", "seed")  # seed across; scheduler becomes the filter
    assert page.locator("th.xlabel").all_text_contents() == ["0", "1"]
    assert page.locator("#filters .filter").evaluate_all("fs => fs.map(f => f.dataset.axis)") == ["scheduler"]
    cells = viewer.cells()
    assert len(cells) == 4 and {c["values"]["scheduler"] for c in cells} == {"ddim"}
    assert all(c["x"] == str(c["values"]["seed"]) and c["y"] == str(c["values"]["steps"]) for c in cells)
    page.select_option("#axis-y", "seed")  # seed down: the axis it leaves (steps) takes its place across
    assert page.locator("#axis-x").input_value() == "steps"
    assert page.locator("th.xlabel").all_text_contents() == ["2", "4"]
    assert page.locator("th.ylabel").all_text_contents() == ["0", "1"]
    print(f"axis switch redraws (ms): {page.evaluate('window.viewerTimings.renders')}")


def test_cell_detail_schedule_and_the_command_that_redraws_it(viewer, tmp_path):
    import pandas as pd

    page = viewer.page
    locator, cell = viewer.cell(scheduler="euler_a", steps=4, seed=1)
    locator.click()
    assert page.locator("#detail").get_attribute("open") is not None
    image = viewer.data["images"][cell["row"]]
    page.wait_for_function("document.getElementById('detail-img').complete")
    assert page.locator("#detail-img").get_attribute("src") == image["full"]  # the full PNG, under the report
    assert page.evaluate("document.getElementById('detail-img').naturalWidth") == 32
    detail = dict(zip(page.locator("#detail-table tr[data-key] th").all_text_contents(),
                      page.locator("#detail-table tr[data-key] td").all_text_contents()))
    values = cell["values"]
    assert (detail["scheduler"], detail["steps"], detail["seed"]) == ("euler_a", "4", "1")
    assert detail["config_hash"] == values["config_hash"] and float(detail["time_total_s"]) > 0
    assert float(detail["prompt_adherence"]) == pytest.approx(values["prompt_adherence"], abs=1e-3)

    schedule = pd.read_csv(f"{values['job_dir']}/schedule.csv")
    page.wait_for_function("document.querySelector('#detail-schedule .main-svg')")  # drawn by Plotly
    assert page.evaluate("document.getElementById('detail-schedule').data[0].y") == pytest.approx(
        list(schedule["sigma"]))
    page.check("input[name=schedule-view][value=snr]")
    page.wait_for_function("document.getElementById('detail-schedule').layout.yaxis.title.text === 'log-SNR'")
    plotted = page.evaluate("document.getElementById('detail-schedule').data[0]")
    assert plotted["y"] == pytest.approx(list(schedule["log_snr"]))
    assert plotted["x"] == pytest.approx(list(schedule["step"] / 4))  # fraction of the 4 steps

    command = page.locator("#detail-command").text_content()
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "runner"] and "seed=1" in words
    redrawn = run_cli(*words[3:], f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    assert redrawn.returncode == 0, redrawn.stderr
    again = next((tmp_path / "again" / "images").glob("*.png"))
    assert np.array_equal(read_png(again), read_png(values["image_path"]))  # exactly that image


def test_ab_compare_side_by_side_wipe_flicker_and_difference(viewer):
    from PIL import Image
    import io

    page = viewer.page
    a_cell, a = viewer.cell(scheduler="ddim", steps=4, seed=0)
    b_cell, b = viewer.cell(scheduler="euler_a", steps=2, seed=0)
    a_cell.click(modifiers=["Shift"])
    b_cell.click(modifiers=["Shift"])
    assert page.locator("#compare").get_attribute("open") is not None
    full_a, full_b = viewer.data["images"][a["row"]]["full"], viewer.data["images"][b["row"]]["full"]
    assert page.locator("#vp-a .img-a").get_attribute("src") == full_a
    assert page.locator("#vp-b .img-b").get_attribute("src") == full_b
    assert page.locator("#label-a").text_content() == "scheduler=ddim · steps=4"
    assert page.locator("#label-b").text_content() == "scheduler=euler_a · steps=2"
    page.wait_for_function("[...document.querySelectorAll('#compare-stage img')].every(i => i.complete)")

    def transforms():
        return page.evaluate("[...document.querySelectorAll('#compare-stage img')].map(i => i.style.transform)")

    fitted = float(page.locator("#compare-stage").get_attribute("data-scale"))
    assert fitted == int(fitted) > 1 and "crisp" in page.locator("#compare-stage").get_attribute("class")
    box = page.locator("#vp-a").bounding_box()
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.wheel(0, -100)  # zoom in over A: B follows
    assert float(page.locator("#compare-stage").get_attribute("data-scale")) > fitted
    assert len(set(transforms())) == 1
    page.mouse.down()
    page.mouse.move(box["x"] + 160, box["y"] + 130)
    page.mouse.up()
    assert len(set(transforms())) == 1 and "translate(" in transforms()[0]

    page.click(".modes button[data-mode=wipe]")
    page.locator("#wipe").fill("30")
    assert page.locator("#vp-b .b-layer").evaluate("l => getComputedStyle(l).clipPath") == "inset(0px 0px 0px 30%)"
    page.click(".modes button[data-mode=flicker]")
    page.wait_for_function("document.getElementById('flicker-state').textContent !== ''")
    shown = {page.locator("#flicker-state").text_content()}
    page.wait_for_function(f"document.getElementById('flicker-state').textContent !== '{shown.pop()}'")

    # difference: what is drawn is |A - B| x the factor (checked pixel by pixel at 1x, at a whole zoom factor)
    page.click(".modes button[data-mode=diff]")
    assert page.locator("#vp-b .b-layer").evaluate("l => getComputedStyle(l).mixBlendMode") == "difference"
    page.select_option("#amp", "1")
    page.click("#zoom-fit")
    scale = int(float(page.locator("#compare-stage").get_attribute("data-scale")))
    tx, ty = page.evaluate("(() => { const m = /translate\\(([-\\d.]+)px, ([-\\d.]+)px\\)/.exec("
                           "document.querySelector('#vp-b .img-a').style.transform); return [+m[1], +m[2]]; })()")
    shot = np.asarray(Image.open(io.BytesIO(page.locator("#vp-b").screenshot())).convert("RGB")).astype(int)
    centres = (np.arange(32) * scale + scale // 2)
    drawn = shot[round(ty) + centres][:, round(tx) + centres]
    expected = np.abs(read_png(a["values"]["image_path"]).astype(int) - read_png(b["values"]["image_path"]))
    assert expected.max() > 20 and np.abs(drawn - expected).max() <= 3
    page.select_option("#amp", "16")
    assert page.locator("#vp-b .stack").evaluate("s => s.style.filter") == "brightness(16)"


def test_compare_the_same_cell_of_two_sweeps(tab, small_sweep, tmp_path):
    from runner import results
    from runner.report import write_report

    other = tmp_path / "other"
    shutil.copytree(small_sweep, other)
    html = write_report(results.load(small_sweep, other), tmp_path / "both")
    viewer = Viewer(tab, html)
    page = viewer.page
    assert page.locator("#axis-x").input_value() == "sweep"
    locator, cell = viewer.cell(sweep="sweep", scheduler="ddim", steps=2, seed=0)  # seed: a filter, at 0
    locator.click()
    page.select_option("#with-axis", "sweep")
    page.select_option("#with-value", label="other")
    page.click("#compare-with")
    assert page.locator("#label-a").text_content() == "sweep=sweep"
    assert page.locator("#label-b").text_content() == "sweep=other"
    b_source = page.locator("#vp-b .img-b").get_attribute("src")
    assert page.locator("#vp-a .img-a").get_attribute("src") == viewer.data["images"][cell["row"]]["full"]
    assert b_source.startswith("images/other/") and b_source.endswith("/000_seed0.png")
    viewer.close()


def test_charts_are_interactive_plotly(viewer):
    page = viewer.page
    page.click("#tabs button[data-tab=charts]")
    charts = len(viewer.data["charts"])
    page.wait_for_function(f"document.querySelectorAll('#charts .js-plotly-plot').length === {charts}")
    sigma = page.locator("#chart-sigma_schedule_chart")
    sigma.locator(".legend .traces").first.click()  # a legend click hides that line
    page.wait_for_function("document.getElementById('chart-sigma_schedule_chart').data[0].visible === 'legendonly'")
    bar = page.locator("#chart-prompt_adherence_chart .bars path").first
    bar.hover(force=True)  # Plotly listens on its drag layer, above the bars
    hover = page.locator("#chart-prompt_adherence_chart .hoverlayer .hovertext")
    hover.wait_for()
    assert "image(s)" in hover.text_content()  # hover shows the value and how many images it averages
    pngs = page.locator("#grid-pngs img")
    assert pngs.count() == 2
    page.wait_for_function("[...document.querySelectorAll('#grid-pngs img')].every(i => i.complete && i.naturalWidth)")


def test_table_sorts_filters_and_hides_heavy_columns(viewer):
    page = viewer.page
    page.click("#tabs button[data-tab=table]")
    headers = page.locator("#results thead tr >> nth=0 >> th").all_text_contents()
    assert headers[0] == "thumbnail" and "prompt_adherence" in headers
    assert "config" not in headers and "job_dir" not in headers and "image_path" not in headers
    assert page.locator("#results tbody tr").count() == 8  # the sweep's rows
    thumbs = page.locator("#results tbody img").evaluate_all("is => is.map(i => i.getAttribute('src'))")
    assert sorted(thumbs) == sorted(i["thumb"] for i in viewer.data["images"])
    page.click("#column-chooser summary")
    page.check("#column-list input[data-column=config]")
    assert "config" in page.locator("#results thead tr >> nth=0 >> th").all_text_contents()
    page.fill("#results thead input[data-column=scheduler]", "=ddim")
    page.locator("#results th[data-column=steps]").click()
    page.locator("#results th[data-column=steps]").click()  # again: descending
    column = headers.index("steps")
    shown = page.locator("#results tbody tr").evaluate_all(
        f"rs => rs.map(r => [r.children[{column}].textContent, r.children[{headers.index('scheduler')}].textContent])")
    assert shown == [["4", "ddim"], ["4", "ddim"], ["2", "ddim"], ["2", "ddim"]]
    assert page.locator("#table-count").text_content() == "4 of 8 rows"
    page.locator("#results tbody img").first.click()  # a thumbnail opens the cell's detail
    assert page.locator("#detail").get_attribute("open") is not None


def thousand_image_sweep(sweep):
    """1,000 images without a model: 10 schedulers x 5 step counts (one job each) x 20 seeds, tiny PNGs and each
    job's rows written with runner.record.write_table, and the multirun.yaml the sweep's order is read from."""
    from PIL import Image

    from runner.jobdir import ROWS_FILE
    from runner.record import write_table

    schedulers, steps, seeds = [f"sampler{n}" for n in range(10)], [5, 10, 20, 40, 80], list(range(20))
    rng = np.random.default_rng(0)
    for job_num, (scheduler, n_steps) in enumerate((s, n) for s in schedulers for n in steps):
        job_dir = sweep / str(job_num)
        (job_dir / "images").mkdir(parents=True)
        rows = []
        for index, seed in enumerate(seeds):
            name = f"images/{index:03d}_seed{seed}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(job_dir / name)
            rows.append(dict(model="fake", scheduler=scheduler, steps=n_steps, guidance=7.5, seed=seed, prompt="a cat",
                             job_dir=str(job_dir), sweep_dir=str(sweep), job_num=job_num, config_hash="fake",
                             overrides=f"scheduler={scheduler} steps={n_steps}", image_path=name, image_sha256="",
                             time_total_s=1.0, time_denoise_s=0.5, prompt_adherence=float(rng.random()),
                             status="ok", error=""))
        write_table(job_dir / ROWS_FILE, rows)
    (sweep / "multirun.yaml").write_text(f"hydra:\n  overrides:\n    task:\n    - scheduler={','.join(schedulers)}\n"
                                         f"    - steps={','.join(map(str, steps))}\n    - seed={seeds}\n")
    return sweep


def test_a_thousand_image_sweep_opens_and_switches_axes(browser, tmp_path):
    """Prints how long the 1,000-image viewer takes to show its first images and to switch axes (README, Sweep
    viewer); asserts what is drawn, never the time."""
    from runner import results
    from runner.report import write_report

    df = results.load(thousand_image_sweep(tmp_path / "sweep"))
    start = time.perf_counter()
    html = write_report(df, tmp_path / "sweep" / "report")
    written = time.perf_counter() - start
    viewer = Viewer(new_page(browser), html)  # a page of its own: the time it prints is a first open's, as a user's
    page = viewer.page
    assert len(viewer.rows) == 1000 and page.locator("#grid td.cell img").count() == 1000
    first_image = page.evaluate("""new Promise(resolve => {
        new PerformanceObserver((list, observer) => {
          resolve(Math.min(...list.getEntries().map(e => e.renderTime || e.loadTime))); observer.disconnect();
        }).observe({type: 'element', buffered: true});
        setTimeout(() => resolve(NaN), 5000); })""")
    switches = []
    for x, y in [("steps", "scheduler"), ("seed", "scheduler"), ("scheduler", "steps")] * 2:
        switches.append(page.evaluate("""([x, y]) => new Promise(resolve => {
            const start = performance.now();
            viewer.setRole('x', x); viewer.setRole('y', y);
            requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now() - start)));
          })""", [x, y]))
        labels = page.locator(".page >> nth=0 >> th.xlabel").all_text_contents()
        assert labels == [str(v) for v in next(a["values"] for a in viewer.data["axes"] if a["key"] == x)]
        assert page.locator("#grid td.cell img").count() == 1000
    print(f"\n1,000-image report written in {written:.1f} s; viewer: first images painted {first_image:.0f} ms "
          f"after navigation start; "
          f"axis switch {statistics.median(switches):.0f} ms median ({', '.join(f'{s:.0f}' for s in switches)} ms)")
    viewer.close()
    page.close()
