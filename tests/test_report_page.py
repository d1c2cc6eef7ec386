"""The whole report page of a real (tiny) run: its sections, the page in a browser, the
command line and ``test.py --report``."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from report.__main__ import main as report_main
from report.browser import check_page, find_chromium, screenshot
from report.build import build_report
from report.page import Page

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["data", "training", "test", "errors", "saliency"]


def section_ids(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('<section id="')[1:]]


def image_sources(html: str) -> list[str]:
    return [part.split('"', 1)[0] for part in html.split('<img src="')[1:]]


@pytest.fixture(scope="module")
def page(trained_run, tmp_path_factory) -> Path:
    """The tiny run's report page, built once for this module."""
    return build_report(trained_run, tmp_path_factory.mktemp("page") / "report", errors=6)


def test_the_page_has_every_section_and_every_image_it_links(page):
    html = page.read_text()
    assert section_ids(html) == SECTIONS
    sources = image_sources(html)
    assert len(sources) >= 8
    for src in sources:
        path = page.parent / src
        assert path.is_file(), src
        with Image.open(path) as image:
            assert image.width >= 100 and image.height >= 50
    assert "test accuracy (swa)" in html  # the headline opens the page


def test_the_headline_figures_are_the_test_reports(page, trained_run):
    report = json.loads((trained_run / "test_report.json").read_text())
    accuracy = report["weights"]["swa"]["accuracy"]
    html = page.read_text()
    assert f"<b>{accuracy:.2%}</b><span>test accuracy (swa)</span>" in html
    # The log's last line is the run's summary (fit_end), not an epoch: 4 epochs ran.
    assert "<b>4</b><span>epochs</span>" in html


def test_a_seed_folder_is_titled_with_its_study(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "study" / "seed-3")
    title = build_report(run, errors=2, per_class=1).read_text().split("<title>")[1]
    assert title.startswith("Run report: study/seed-3</title>")


def test_a_run_not_yet_tested_gets_data_and_training_and_says_how_to_add_the_rest(
    trained_run, tmp_path
):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "test_report.json").unlink()
    html = build_report(run).read_text()
    assert section_ids(html) == ["data", "training", "test"]
    assert f"python test.py --run-dir {run} --report" in html


def test_text_is_escaped(tmp_path):
    page = Page(tmp_path, "a <b> & c")
    page.section("s", "x<y").text("1 < 2 & <script>")
    html = page.render()
    assert "<script>" not in html.split("<style>")[0] + html.split("</style>")[1]
    assert "1 &lt; 2 &amp; &lt;script&gt;" in html and "a &lt;b&gt; &amp; c" in html


def test_the_command_line_writes_the_page_and_refuses_a_missing_folder(
    trained_run, tmp_path, capsys
):
    out = tmp_path / "r"
    assert report_main([str(trained_run), "--out", str(out), "--errors", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {out / 'index.html'}"
    assert report_main([str(tmp_path / "gone")]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: run folder {tmp_path / 'gone'} does not exist"
    )


def test_test_py_report_scores_the_run_then_writes_its_page(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "report", ignore_errors=True)
    spec = importlib.util.spec_from_file_location("entry_test_script_report", ROOT / "test.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--run-dir", str(run), "--report", "--batch-size", "32"]) == 0
    assert section_ids((run / "report" / "index.html").read_text()) == SECTIONS


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run does)",
)


@needs_chromium
def test_in_a_browser_every_image_loads_nothing_errs_and_a_screenshot_is_taken(page):
    check = check_page(page, CHROMIUM)
    assert check.sections == SECTIONS
    assert check.images == len(image_sources(page.read_text())) and check.images >= 8
    assert check.broken == [] and check.errors == []
    shot = screenshot(page, page.parent / "screenshot.png", CHROMIUM, size=(1280, 1600))
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 < colours[1]  # text and figures on a light page, not a blank one


@needs_chromium
def test_the_browser_check_finds_a_broken_image(tmp_path):
    page = Page(tmp_path, "broken")
    section = page.section("s", "s")
    section.blocks.append('<img src="missing.png">')
    check = check_page(page.write(), CHROMIUM)
    assert check.broken == ["missing.png"]
    assert any("missing.png" in e for e in check.errors)


@pytest.mark.parametrize(("channels", "size"), [(1, 64), (3, 224)])
def test_grey_and_large_images_get_the_whole_page(tmp_path, channels, size):
    from tests.conftest import train_tiny_run

    run = train_tiny_run(tmp_path, channels=channels, size=size)
    page = build_report(run, errors=4, per_class=1)
    html = page.read_text()
    assert section_ids(html) == SECTIONS
    assert all((page.parent / src).is_file() for src in image_sources(html))


def test_a_negative_image_count_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        report_main(["runs/x", "--errors", "-1"])
    assert exit_info.value.code == 2
    assert "argument --errors: '-1' is invalid; allowed: an int >= 0" in capsys.readouterr().err
