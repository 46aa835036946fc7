"""Tests of the run report (fedinspect.evaluation.report) and its figures (fedinspect.evaluation.plots)."""

from __future__ import annotations

import copy
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from PIL import Image

from fedinspect.evaluation import plots
from fedinspect.evaluation.report import (
    Curves,
    Example,
    compression_rows,
    format_megabytes,
    format_metric,
    format_percent,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ("pipe_clip", "tank_screw")

# ----------------------------------------------------------------------------------------------
# Synthetic inputs: 2 categories, 3 clients
# ----------------------------------------------------------------------------------------------


def category_block(image_auroc, spro05, pixel=0.95, good=10, defective=10):
    return {
        "image_auroc": image_auroc,
        "pixel_auroc": pixel,
        "auc_spro": {"0.01": 0.11, "0.05": spro05, "0.1": 0.44, "0.3": 0.66, "1.0": 0.88},
        "counts": {"test": good + defective, "test_good": good, "test_defective": defective},
    }


def make_results() -> dict:
    return {
        "config": {
            "clients": 3,
            "partition": "iid",
            "strategy": "federated_coreset",
            "seed": 0,
            "bank": "per_category",
        },
        "categories": {"pipe_clip": category_block(0.91, 0.52), "tank_screw": category_block(0.83, 0.40)},
        # Deliberately not the arithmetic mean of the categories: the report prints the given mean.
        "mean": {"image_auroc": 0.87654, "pixel_auroc": 0.95, "auc_spro": {"0.01": 0.11, "0.05": 0.4567, "0.1": 0.44}},
        "clients": [
            {
                "client": 0,
                "samples": 305,
                "patches": 59780,
                "coreset": 5978,
                "weight": 0.4,
                "bytes_sent": 1_500_000,
                "categories": {"pipe_clip": 200, "tank_screw": 105},
            },
            {
                "client": 1,
                "samples": 305,
                "patches": 59780,
                "coreset": 5978,
                "weight": 0.35,
                "bytes_sent": 2_250_000,
                "categories": {"pipe_clip": 100, "tank_screw": 205},
            },
            {
                "client": 2,
                "samples": 304,
                "patches": 59584,
                "coreset": 5958,
                "weight": 0.25,
                "bytes_sent": 3_000_000,
                "categories": {"pipe_clip": 4, "tank_screw": 300},
            },
        ],
        "stages": {"raw_patches": 298508, "local_coreset": 29850, "global_bank": 10000},
        "timing": {
            "feature_extraction_s": 12.0,
            "local_coreset_s": 3.0,
            "aggregation_s": 1.0,
            "evaluation_s": 4.0,
            "total_s": 20.0,
        },
        "centralized": {
            "categories": {"pipe_clip": category_block(0.96, 0.55), "tank_screw": category_block(0.90, 0.47)},
            "mean": {"image_auroc": 0.93, "pixel_auroc": 0.96, "auc_spro": {"0.05": 0.51}},
            "timing": {"feature_extraction_s": 11.0, "total_s": 18.0},
        },
        "shared_bank": {
            "categories": {"pipe_clip": category_block(0.81, 0.42), "tank_screw": category_block(0.73, 0.30)},
        },
    }


def random_curves(rng: np.random.Generator) -> Curves:
    fpr = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 50)), [1.0]])
    spro = np.maximum.accumulate(np.clip(np.sqrt(fpr) + rng.normal(0, 0.02, fpr.size), 0, 1))
    spro[0], spro[-1] = 0.0, 1.0
    roc_fpr = np.concatenate([[0.0], np.sort(rng.uniform(0, 1, 8)), [1.0]])
    roc_tpr = np.maximum.accumulate(np.clip(roc_fpr**0.4, 0, 1))
    return Curves(spro_fpr=fpr, spro=spro, roc_fpr=roc_fpr, roc_tpr=roc_tpr)


def make_curves(models=("federated", "centralized"), seed=0) -> dict[str, dict[str, Curves]]:
    rng = np.random.default_rng(seed)
    return {model: {c: random_curves(rng) for c in CATEGORIES} for model in models}


def make_example(category: str, defect: str, offset: float, scale: float, seed: int = 0, size=(24, 32)) -> Example:
    rng = np.random.default_rng(seed)
    height, width = size
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    anomaly_map = offset + scale * rng.uniform(0, 1, (height, width))
    truth = np.zeros((height, width), dtype=bool)
    if defect != "good":
        truth[5:12, 8:20] = True
    return Example(category, defect, f"{seed:04d}.png", image, anomaly_map, truth, float(anomaly_map.max()))


def make_examples() -> list[Example]:
    return [
        make_example("pipe_clip", "good", 0.0, 1.0, seed=1),
        make_example("pipe_clip", "scratch", 0.5, 3.0, seed=2),
        make_example("tank_screw", "missing", 10.0, 5.0, seed=3, size=(40, 30)),
    ]


# ----------------------------------------------------------------------------------------------
# Parsing the reports
# ----------------------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table: a list of rows (the header first, the alignment row dropped), cells stripped of **."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if all(re.fullmatch(r":?-+:?", c) for c in cells):
                continue
            if current is None:
                current = []
                tables.append(current)
            current.append(cells)
        else:
            current = None
    return tables


def markdown_images(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


class ReportParser(HTMLParser):
    """Counts start/end tags, collects <img> sources and the cell texts of every table."""

    VOID = frozenset({"img", "meta", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.starts: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        self.stack: list[str] = []
        self.mismatched: list[str] = []
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.starts[tag] = self.starts.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_startendtag(self, tag, attrs):
        self.starts[tag] = self.starts.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        self.ends[tag] = self.ends.get(tag, 0) + 1
        if not self.stack or self.stack[-1] != tag:
            self.mismatched.append(tag)
        else:
            self.stack.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_html(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def table_with_header(tables, first_cell: str, contains: str | None = None):
    for table in tables:
        if table[0][0] == first_cell and (contains is None or any(contains in h for h in table[0])):
            return table
    raise AssertionError(f"no table starting with {first_cell!r} (containing {contains!r})")


def row_named(table, name: str) -> dict[str, str]:
    for row in table[1:]:
        if row[0] == name:
            return dict(zip(table[0], row, strict=True))
    raise AssertionError(f"no row {name!r} in table {table[0]}")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    """One full report (read only by the tests that use it): (report.md, report.html, Markdown text)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    md, html = write_report(run_dir, make_results(), make_curves(), make_examples(), title="Test run")
    return md, html, md.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# The report files
# ----------------------------------------------------------------------------------------------


def test_report_files_and_every_referenced_figure_exist(report):
    md, html, text = report
    assert md == md.parent / "report.md" and html == md.parent / "report.html"
    assert text.startswith("# Test run\n")
    md_images = markdown_images(text)
    html_images = parse_html(html).images
    assert md_images == html_images
    assert set(md_images) == {
        "figures/spro_curves.png",
        "figures/roc_curves.png",
        "figures/metrics_per_category.png",
        "figures/examples_pipe_clip.png",
        "figures/examples_tank_screw.png",
    }
    for src in md_images:
        assert not Path(src).is_absolute()
        path = md.parent / src
        assert path.is_file(), src
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 300 and image.size[1] > 200


def test_markdown_and_html_hold_the_same_tables(report):
    _, html, text = report
    md_tables = markdown_tables(text)
    html_tables = parse_html(html).tables
    assert len(md_tables) == len(html_tables) >= 8
    assert md_tables == html_tables


def test_client_table_total_row_is_the_sum(report):
    _, _, text = report
    table = table_with_header(markdown_tables(text), "Client", "Bytes sent")
    assert [row[0] for row in table[1:]] == ["Client 0", "Client 1", "Client 2", "Total/Avg"]
    assert row_named(table, "Client 2") == {
        "Client": "Client 2",
        "Samples": "304",
        "Patches": "59,584",
        "Coreset": "5,958",
        "Weight": "0.250",
        "Bytes sent": "3.00 MB",
    }
    total = row_named(table, "Total/Avg")
    assert total["Samples"] == "914"
    assert total["Patches"] == "179,144"
    assert total["Coreset"] == "17,914"
    assert total["Weight"] == "1.000"
    assert total["Bytes sent"] == "6.75 MB"
    # The partition table: images per client and category, summed both ways.
    partition = table_with_header(markdown_tables(text), "Client", "pipe_clip")
    assert row_named(partition, "Client 2") == {
        "Client": "Client 2",
        "pipe_clip": "4",
        "tank_screw": "300",
        "Total": "304",
    }
    assert row_named(partition, "Total") == {"Client": "Total", "pipe_clip": "304", "tank_screw": "610", "Total": "914"}


def test_compression_table_hand_values(report):
    _, _, text = report
    table = table_with_header(markdown_tables(text), "Stage")
    assert table[1:] == [
        ["Raw extraction", "298,508", "100%"],
        ["Local coreset", "29,850", "10%"],
        ["Global bank", "10,000", "3.35%"],
    ]
    assert "298,508 → 29,850 → 10,000 patches, a 96.7% reduction" in text


def test_compression_rows_order_and_fractions():
    rows = compression_rows({"global_bank": 50, "raw_patches": 1000, "local_coreset": 200, "after_dp": 40})
    assert rows == [
        ("Raw extraction", 1000, 1.0),
        ("Local coreset", 200, 0.2),
        ("Global bank", 50, 0.05),
        ("After dp", 40, 0.04),
    ]
    assert compression_rows({"global_bank": 10})[0] == ("Global bank", 10, None)


def test_results_tables_numbers_and_given_mean(report):
    _, _, text = report
    tables = markdown_tables(text)
    federated = table_with_header(tables, "Category", "Test images (good / defective)")
    assert federated[0][:7] == [
        "Category",
        "AUC-sPRO@0.01",
        "AUC-sPRO@0.05",
        "AUC-sPRO@0.1",
        "AUC-sPRO@0.3",
        "Image AUROC",
        "Pixel AUROC",
    ]
    pipe = row_named(federated, "pipe_clip")
    assert pipe["AUC-sPRO@0.05"] == "0.520" and pipe["Image AUROC"] == "0.910"
    assert pipe["Test images (good / defective)"] == "20 (10 / 10)"
    mean = row_named(federated, "Mean")
    assert mean["Image AUROC"] == "0.877"  # the given mean 0.87654, not the category average 0.870
    assert mean["AUC-sPRO@0.05"] == "0.457"
    assert mean["AUC-sPRO@0.3"] == "n/a"  # absent from the given mean block
    comparison = table_with_header(tables, "Category", "Image AUROC central.")
    assert row_named(comparison, "tank_screw")["Δ image AUROC (points)"] == "-7.0"
    assert row_named(comparison, "pipe_clip")["Δ AUC-sPRO@0.05 (points)"] == "-3.0"
    assert row_named(comparison, "Mean")["Image AUROC central."] == "0.930"
    shared = table_with_header(tables, "Category", "Image AUROC shared")
    assert row_named(shared, "pipe_clip") == {
        "Category": "pipe_clip",
        "Image AUROC per-cat.": "0.910",
        "Image AUROC shared": "0.810",
        "Δ image AUROC (points)": "+10.0",
        "AUC-sPRO@0.05 per-cat.": "0.520",
        "AUC-sPRO@0.05 shared": "0.420",
        "Δ AUC-sPRO@0.05 (points)": "+10.0",
    }
    # The summary: means and the difference in points, bytes sent.
    assert "mean image AUROC of 0.877" in text
    assert "-5.3 points of image AUROC" in text
    assert "The 3 clients sent 6.75 MB in total" in text


def test_undefined_metric_renders_na(tmp_path: Path):
    results = make_results()
    results["categories"]["tank_screw"]["image_auroc"] = None
    results["categories"]["tank_screw"]["auc_spro"]["0.1"] = float("nan")
    results["mean"]["image_auroc"] = None
    md, html = write_report(tmp_path, results, make_curves(), [])
    text = md.read_text(encoding="utf-8")
    federated = table_with_header(markdown_tables(text), "Category", "Test images (good / defective)")
    row = row_named(federated, "tank_screw")
    assert row["Image AUROC"] == "n/a" and row["AUC-sPRO@0.1"] == "n/a"
    assert row["AUC-sPRO@0.05"] == "0.400"
    assert row_named(federated, "Mean")["Image AUROC"] == "n/a"
    comparison = table_with_header(markdown_tables(text), "Category", "Image AUROC central.")
    assert row_named(comparison, "tank_screw")["Δ image AUROC (points)"] == "n/a"
    assert row_named(comparison, "tank_screw")["Δ AUC-sPRO@0.05 (points)"] == "-7.0"
    assert "mean image AUROC of n/a" in text
    assert "n/a" in html.read_text(encoding="utf-8")


def test_without_centralized_baseline(tmp_path: Path):
    results = make_results()
    del results["centralized"]
    md, html = write_report(tmp_path, results, make_curves(models=("federated",)), make_examples())
    text = md.read_text(encoding="utf-8")
    assert "no centralized baseline in results.json" in text
    assert "No centralized baseline was evaluated." in text
    for table in markdown_tables(text):
        assert not any("central" in header.lower() for header in table[0]), table[0]
    for src in markdown_images(text):
        assert (tmp_path / src).is_file()
    assert "figures/spro_curves.png" in markdown_images(text)
    assert parse_html(html).images == markdown_images(text)


def test_html_is_well_formed_and_self_contained(report):
    _, html, _ = report
    source = html.read_text(encoding="utf-8")
    parser = parse_html(html)
    assert parser.mismatched == [] and parser.stack == []
    for tag in ("table", "tr", "td", "th", "thead", "tbody", "figure", "ul", "li", "p", "h2", "h3"):
        assert parser.starts.get(tag, 0) == parser.ends.get(tag, 0), tag
    assert parser.starts["table"] >= 8 and parser.starts["img"] == 5
    ET.fromstring(source.removeprefix("<!DOCTYPE html>\n"))  # XHTML-like: parses as XML
    assert "<style>" in source
    assert "<script" not in source.lower()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", source)


def test_markup_characters_are_escaped(tmp_path: Path):
    results = make_results()
    results["categories"]["a<b>|c&d"] = results["categories"].pop("tank_screw")
    md, html = write_report(tmp_path, results, None, None, title="Run <1> & co")
    source = html.read_text(encoding="utf-8")
    ET.fromstring(source.removeprefix("<!DOCTYPE html>\n"))
    assert "Run &lt;1&gt; &amp; co" in source
    federated = table_with_header(markdown_tables(md.read_text(encoding="utf-8")), "Category", "Test images")
    assert [row[0] for row in federated[1:]] == ["pipe_clip", "a<b>\\|c&d", "Mean"]


def test_missing_blocks_are_skipped_with_notes(tmp_path: Path):
    results = {"categories": {"pipe_clip": category_block(0.9, 0.5)}}
    md, html = write_report(tmp_path, results, None, None)
    text = md.read_text(encoding="utf-8")
    for note in (
        "no configuration in results.json",
        "no client statistics in results.json",
        "no stage counts in results.json",
        "no centralized baseline in results.json",
        "no curves were given",
        "no example images were given",
    ):
        assert note in text and note in html.read_text(encoding="utf-8"), note
    # The bar chart needs only the results: it is there, for a single category.
    assert markdown_images(text) == ["figures/metrics_per_category.png"]
    assert (tmp_path / "figures" / "metrics_per_category.png").is_file()
    # Nothing at all still gives two files.
    md, html = write_report(tmp_path / "empty", {}, {}, [])
    assert md.is_file() and html.is_file()
    assert "results.json holds no per-category results." in md.read_text(encoding="utf-8")


def test_single_class_category_skips_roc_with_note(tmp_path: Path):
    results = make_results()
    results["categories"]["tank_screw"] = category_block(None, 0.4, good=0, defective=12)
    curves = make_curves()
    for per_category in curves.values():
        per_category["tank_screw"].roc_fpr = per_category["tank_screw"].roc_tpr = None
    md, _ = write_report(tmp_path, results, curves, [])
    text = md.read_text(encoding="utf-8")
    assert "ROC skipped for tank_screw" in text
    assert "figures/roc_curves.png" in markdown_images(text)
    # Only one category left: ROC still drawn for pipe_clip alone.
    results["categories"]["pipe_clip"] = category_block(None, 0.4, good=9, defective=0)
    md, _ = write_report(tmp_path / "none", results, curves, [])
    text = md.read_text(encoding="utf-8")
    assert "ROC skipped for pipe_clip, tank_screw" in text
    assert "figures/roc_curves.png" not in markdown_images(text)
    assert "figures/spro_curves.png" in markdown_images(text)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


@pytest.mark.parametrize("categories", [("pipe_clip",), CATEGORIES])
def test_plot_functions_return_existing_pngs(tmp_path: Path, categories):
    curves = {m: {c: v for c, v in per.items() if c in categories} for m, per in make_curves().items()}
    results = make_results()
    blocks = {"federated": {c: results["categories"][c] for c in categories}}
    examples = [e for e in make_examples() if e.category in categories]
    outputs = [
        (plots.plot_spro_curves(curves, tmp_path / "a" / "spro.png"), tmp_path / "a" / "spro.png"),
        (
            plots.plot_roc_curves(curves, tmp_path / "roc.png", aurocs={"federated": {"pipe_clip": 0.5}}),
            tmp_path / "roc.png",
        ),
        (plots.plot_metric_bars(blocks, tmp_path / "bars.png"), tmp_path / "bars.png"),
        (plots.plot_examples(examples, tmp_path / "examples.png"), tmp_path / "examples.png"),
    ]
    for returned, expected in outputs:
        assert returned == expected
        assert_png(returned)


def test_plots_handle_missing_curves_and_metrics(tmp_path: Path):
    curves = {"federated": {"pipe_clip": Curves()}, "centralized": {}}
    assert_png(plots.plot_spro_curves(curves, tmp_path / "spro.png"))
    assert_png(plots.plot_roc_curves(curves, tmp_path / "roc.png"))
    blocks = {"federated": {"pipe_clip": {"image_auroc": None}}, "centralized": {"pipe_clip": category_block(0.9, 0.5)}}
    assert_png(plots.plot_metric_bars(blocks, tmp_path / "bars.png"))
    assert_png(plots.plot_examples([], tmp_path / "examples.png"))


def test_png_output_is_deterministic(tmp_path: Path):
    curves = make_curves()
    first = plots.plot_spro_curves(curves, tmp_path / "one.png").read_bytes()
    second = plots.plot_spro_curves(curves, tmp_path / "two.png").read_bytes()
    assert first == second
    assert b"matplotlib" not in first.lower()


def test_heatmap_ranges_are_shared_per_category():
    examples = make_examples()
    examples[0].anomaly_map[0, 0] = np.nan  # ignored
    ranges = plots.heatmap_ranges(examples)
    pipe = [e.anomaly_map[np.isfinite(e.anomaly_map)] for e in examples[:2]]
    assert set(ranges) == {"pipe_clip", "tank_screw"}
    assert ranges["pipe_clip"] == (min(p.min() for p in pipe), max(p.max() for p in pipe))
    assert ranges["pipe_clip"][0] < 1.0 < 3.0 < ranges["pipe_clip"][1]  # spans both examples
    assert ranges["tank_screw"] == (examples[2].anomaly_map.min(), examples[2].anomaly_map.max())
    constant = make_example("flat", "good", 2.0, 0.0)
    assert plots.heatmap_ranges([constant]) == {"flat": (1.5, 2.5)}


def test_plot_examples_draws_every_heatmap_on_its_category_scale(tmp_path: Path, monkeypatch):
    calls = []
    original = Axes.imshow

    def spy(self, data, *args, **kwargs):
        if kwargs.get("vmin") is not None:
            calls.append((np.asarray(data).shape, kwargs["vmin"], kwargs["vmax"]))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    examples = make_examples()
    ranges = plots.heatmap_ranges(examples)
    plots.plot_examples(examples, tmp_path / "examples.png")
    assert [(vmin, vmax) for _, vmin, vmax in calls] == [
        ranges["pipe_clip"],
        ranges["pipe_clip"],
        ranges["tank_screw"],
    ]
    # Ranges given for more examples than drawn win (one scale across several figures).
    calls.clear()
    plots.plot_examples(examples[1:2], tmp_path / "one.png", ranges=ranges)
    assert [(vmin, vmax) for _, vmin, vmax in calls] == [ranges["pipe_clip"]]


def test_write_report_uses_one_scale_per_category_across_figures(tmp_path: Path, monkeypatch):
    seen = []
    original = plots.plot_examples

    def spy(examples, path, ranges=None):
        seen.append(copy.deepcopy(ranges))
        return original(examples, path, ranges=ranges)

    monkeypatch.setattr(plots, "plot_examples", spy)
    examples = make_examples()
    write_report(tmp_path, make_results(), None, examples)
    assert seen == [plots.heatmap_ranges(examples)] * 2


# ----------------------------------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------------------------------


def test_formatting_helpers():
    assert format_metric(None) == format_metric(float("nan")) == "n/a"
    assert format_metric(0.91234) == "0.912"
    assert format_megabytes(1_234_567) == "1.23 MB"
    assert format_megabytes(1234) == "0.0012 MB"
    assert format_megabytes(None) == "n/a"
    assert [format_percent(x) for x in (1.0, 29850 / 298508, 10000 / 298508, 0.0)] == ["100%", "10%", "3.35%", "0%"]


# ----------------------------------------------------------------------------------------------
# Readability: configuration, budget, signed zeros, scales, empty columns, legends, line styles
# ----------------------------------------------------------------------------------------------


def run_config(**changes) -> dict:
    """A config block as the runner writes it (FederationConfig.to_dict)."""
    config = {
        "clients": 5, "partition": "iid", "alpha": 0.5, "strategy": "federated_coreset", "global_size": 10_000,
        "global_ratio": None, "bank": "per_category", "min_per_client": 100, "min_clients": 1, "centralized": True,
        "centralized_coreset_ratio": 0.1, "compare_shared": False, "write_maps": True, "examples_per_category": 3,
        "attack_data": "",
        "settings": {"backbone": "efficientnet_lite0", "layers": None, "image_size": 256, "local_coreset_ratio": 0.03,
                     "projection_dim": 64, "coreset_chunk_size": 16384, "precision": "float16", "seed": 0,
                     "obfuscation": "", "dp_unit": "", "dp_epsilon": 0.0, "dp_noise_multiplier": 0.0,
                     "dp_delta": 1e-5, "dp_clip_norm": 1.0, "dp_patches_per_image": 16, "dp_clusters": 8,
                     "dp_iterations": 2},
        "seed": 0,
    }
    settings = {k: changes.pop(k) for k in list(changes) if k in config["settings"]}
    config.update(changes)
    config["settings"].update(settings)
    return config


def test_configuration_is_a_readable_table_of_what_applies(tmp_path: Path):
    results = make_results()
    results["config"] = run_config()
    md, html = write_report(tmp_path, results, None, None)
    text = md.read_text(encoding="utf-8")
    table = table_with_header(markdown_tables(text), "Setting")
    values = dict(table[1:])
    assert values["Clients"] == "5" and values["Partition of the training images"] == "iid"
    assert values["Global bank budget (patches, all banks)"] == "10,000"
    assert values["Centralized baseline"] == "yes" and values["Also evaluate one shared bank"] == "no"
    assert values["Backbone"] == "efficientnet_lite0" and values["Local coreset ratio"] == "0.03"
    assert values["Seed"] == "0" and [row[0] for row in table].count("Seed") == 1
    for absent in ("Dirichlet concentration α", "Minimum patches per client (diversity preserving)",
                   "Attacker's data (inversion and membership attacks)", "Backbone layers", "Image obfuscation",
                   "DP unit", "DP δ", "Global bank budget (fraction of each bank's raw patches)"):
        assert absent not in values, absent
    for raw in ("None", "True", "False", '{"'):
        assert raw not in "\n".join(" ".join(row) for row in table), raw
    assert parse_html(html).tables == markdown_tables(text)


def test_configuration_shows_alpha_strategy_option_and_dp_only_when_they_apply():
    from fedinspect.evaluation.report import config_table

    table = config_table(run_config(partition="dirichlet", strategy="diversity_preserving", global_ratio=0.05,
                                    dp_unit="image", dp_epsilon=5.0, obfuscation="average,shuffle",
                                    layers=["blocks.3", "blocks.4"], attack_data="/data/attacker"))
    values = dict(table.rows)
    assert values["Dirichlet concentration α"] == "0.5"
    assert values["Minimum patches per client (diversity preserving)"] == "100"
    assert values["Global bank budget (fraction of each bank's raw patches)"] == "0.05"
    assert "Global bank budget (patches, all banks)" not in values  # the ratio replaces it
    assert values["DP unit"] == "image" and values["DP target ε"] == "5" and values["DP δ"] == "1e-05"
    assert "DP noise multiplier" not in values  # 0 = not given: the accountant solved it from epsilon
    assert values["Backbone layers"] == "blocks.3, blocks.4"
    assert values["Image obfuscation"] == "average,shuffle"
    assert values["Attacker's data (inversion and membership attacks)"] == "/data/attacker"


def test_configuration_shows_the_poisoning_drill_only_when_it_runs():
    from fedinspect.evaluation.report import config_table

    off = dict(config_table(run_config(poison="", poisoned_clients=0, poison_strength=0.0)).rows)
    assert not [label for label in off if label.startswith("Poisoning")]
    on = dict(config_table(run_config(poison="defects", poisoned_clients=2, poison_strength=0.0)).rows)
    assert on["Poisoning drill: attack"] == "defects"
    assert on["Poisoning drill: poisoned clients (the last ones)"] == "2"


def test_global_bank_that_kept_everything_says_why(tmp_path: Path):
    from fedinspect.evaluation.report import describe_stages

    results = make_results()
    results["config"] = run_config()
    results["stages"] = {"raw_patches": 115_200, "local_coreset": 3_456, "global_bank": 3_456}
    md, _ = write_report(tmp_path, results, None, None)
    text = md.read_text(encoding="utf-8")
    table = table_with_header(markdown_tables(text), "Stage")
    assert table[0] == ["Stage", "Patches", "Kept", "Note"]
    assert row_named(table, "Global bank")["Note"] == "the server kept every sent patch: under the 10,000 budget"
    assert row_named(table, "Local coreset")["Note"] == ""
    assert "the server kept every patch the clients sent (under the 10,000 budget)" in text
    assert describe_stages(results["stages"], results["config"]) == (
        "patches: 115,200 extracted -> 3,456 sent (local coresets) -> 3,456 in the global banks "
        "(all kept: under the 10,000 budget)"
    )
    shared = run_config(bank="shared", global_ratio=0.05)
    assert describe_stages(results["stages"], shared).endswith(
        "3,456 in the global bank (all kept: under the budget of 0.05 of each bank's raw patches)")
    assert describe_stages(results["stages"], run_config(strategy="concatenate")).endswith(
        "(all kept: the concatenate strategy keeps every patch)")
    subsampled = {"raw_patches": 298_508, "local_coreset": 29_850, "global_bank": 10_000}
    assert describe_stages(subsampled, results["config"]) == (
        "patches: 298,508 extracted -> 29,850 sent (local coresets) -> 10,000 in the global banks")


def test_differences_have_no_signed_zero(tmp_path: Path):
    from fedinspect.evaluation.report import format_points

    assert format_points(-0.0004) == format_points(0.0004) == format_points(0.0) == "0.0"
    assert format_points(-0.07) == "-7.0" and format_points(0.1) == "+10.0"
    results = make_results()
    results["centralized"]["categories"]["pipe_clip"] = category_block(0.91 + 1e-9, 0.52 - 1e-9)
    md, _ = write_report(tmp_path, results, None, None)
    text = md.read_text(encoding="utf-8")
    comparison = table_with_header(markdown_tables(text), "Category", "Image AUROC central.")
    row = row_named(comparison, "pipe_clip")
    assert row["Δ image AUROC (points)"] == row["Δ AUC-sPRO@0.05 (points)"] == "0.0"
    assert "-0.0" not in text and "+0.0" not in text


def test_heatmap_scales_share_one_number_format_and_the_score_is_explained(tmp_path: Path):
    from fedinspect.evaluation.report import scale_text

    assert scale_text(0.0123, 1.5) == "0.012 to 1.500"
    assert scale_text(12.5, 40.0) == "12.50 to 40.00"
    assert scale_text(1200.0, 5400.0) == "1,200 to 5,400"
    assert scale_text(0.0001, 0.0042) == "0.00010 to 0.00420"
    md, _ = write_report(tmp_path, make_results(), None, make_examples())
    text = md.read_text(encoding="utf-8")
    captions = re.findall(r"\*Examples of \w+ \(heatmap colour scale ([-\d.,]+ to [-\d.,]+); an image score is "
                          r"reweighted and can lie above the scale's top\)\.\*", text)
    assert len(captions) == 2
    for caption in captions:
        low, high = caption.split(" to ")
        assert len(low.split(".")[1]) == len(high.split(".")[1]), caption  # same number of decimals
    assert "can lie above the map's maximum" in text and "above the top of the colour scale" in text


def captured_figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions save (captured before they are cleared)."""
    figures = []
    original = plots._save

    def spy(fig, path):
        figures.append({
            "name": Path(path).name,
            "legends": [ax.get_legend() is not None for ax in fig.axes if ax.get_visible()],
            "lines": [[(line.get_label(), line.get_linestyle(), line.get_linewidth(), line.get_marker())
                       for line in ax.get_lines()] for ax in fig.axes],
            "titles": [ax.get_title() for ax in fig.axes],
        })
        return original(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figures


def test_single_model_charts_have_no_legend(tmp_path: Path, monkeypatch):
    figures = captured_figures(monkeypatch)
    results = make_results()
    one = {"federated": {c: results["categories"][c] for c in CATEGORIES}}
    plots.plot_metric_bars(one, tmp_path / "one.png")
    two = {**one, "centralized": {c: results["centralized"]["categories"][c] for c in CATEGORIES}}
    plots.plot_metric_bars(two, tmp_path / "two.png")
    assert figures[0]["legends"] == [False, False]
    assert figures[1]["legends"] == [True, True]


def test_per_client_results_drop_the_empty_note_column(tmp_path: Path, monkeypatch):
    figures = captured_figures(monkeypatch)
    results = make_results()
    for client in results["clients"]:
        client.update(test_counts={"test": 6, "test_good": 3, "test_defective": 3}, test_categories={"pipe_clip": 6},
                      image_auroc=0.9, auc_spro={"0.05": 0.5}, notes={})
    md, html = write_report(tmp_path / "a", results, None, None)
    table = table_with_header(markdown_tables(md.read_text(encoding="utf-8")), "Client", "Image AUROC")
    assert "Note" not in table[0] and parse_html(html).tables == markdown_tables(md.read_text(encoding="utf-8"))
    chart = next(f for f in figures if f["name"] == "metrics_per_client.png")
    assert chart["legends"] == [False, False]  # one model (the global one): no one-entry legend
    results["clients"][1]["notes"] = {"image_auroc": "a single test class"}
    md, _ = write_report(tmp_path / "b", results, None, None)
    table = table_with_header(markdown_tables(md.read_text(encoding="utf-8")), "Client", "Image AUROC")
    assert table[0][-1] == "Note" and row_named(table, "Client 1")["Note"] == "image_auroc: a single test class"


def test_coinciding_curves_stay_distinguishable(tmp_path: Path, monkeypatch):
    figures = captured_figures(monkeypatch)
    same = make_curves(models=("federated",))["federated"]
    curves = {"federated": same, "centralized": dict(same)}  # identical curves: one would hide the other
    plots.plot_spro_curves(curves, tmp_path / "spro.png")
    plots.plot_roc_curves(curves, tmp_path / "roc.png")
    for figure in figures:
        lines = [line for line in figure["lines"][0] if line[0] in ("federated", "centralized")
                 or line[0].startswith(("federated (", "centralized ("))]
        assert len(lines) == 2
        (_, style_a, width_a, _), (_, style_b, width_b, marker_b) = lines
        assert style_a != style_b and width_a > 1.5 * width_b and marker_b not in ("", "None")
    assert "Where two curves coincide" in plots.line_style_note(["federated", "centralized"])
    assert plots.line_style_note(["federated"]) == ""


def test_example_titles_give_map_maximum_and_image_score(tmp_path: Path, monkeypatch):
    figures = captured_figures(monkeypatch)
    example = make_example("pipe_clip", "scratch", 0.0, 1.0, seed=2)
    example.score = 1.75  # above the map's maximum (< 1): the reweighted image score
    plots.plot_examples([example], tmp_path / "examples.png")
    peak = float(example.anomaly_map.max())
    assert f"anomaly map (max {peak:.3f})\nimage score 1.750" in figures[0]["titles"]


# ----------------------------------------------------------------------------------------------
# The shared document model
# ----------------------------------------------------------------------------------------------


def test_document_tables_align_numbers_drop_empty_columns_and_reject_ragged_rows(tmp_path: Path):
    from fedinspect.evaluation.document import Document, Table

    table = Table(["name", "count", "share", "empty", "note"],
                  [["a", "1,000", "3.35%", "", "x"], ["b", "n/a", "10%", " ", ""]])
    assert table.numeric == [False, True, True, False, False]
    shown = table.shown()
    assert shown.header == ["name", "count", "share", "note"] and shown.rows[1] == ["b", "n/a", "10%", ""]
    with pytest.raises(ValueError, match="a row of 2 cells in a table of 3 columns"):
        Table(["a", "b", "c"], [["1", "2"]])
    doc = Document("Doc <&>")
    doc.heading("Part")
    doc.table(["k", "v"], [["<b>", 3]])
    doc.figure("figures/x.png", 'a "quoted" caption')
    md, html = doc.write(tmp_path)
    assert md.read_text(encoding="utf-8").startswith("# Doc <&>\n")
    source = html.read_text(encoding="utf-8")
    ET.fromstring(source.removeprefix("<!DOCTYPE html>\n"))
    assert "<title>Doc &lt;&amp;&gt;</title>" in source and "&lt;b&gt;" in source
    assert 'alt="a &#34;quoted&#34; caption"' in source
    assert parse_html(html).tables == [[["k", "v"], ["<b>", "3"]]]


def test_every_report_builder_uses_the_shared_document_model():
    import fedinspect.classification.report as classification
    import fedinspect.evaluation.privacy_report as privacy
    import fedinspect.evaluation.report as run
    import fedinspect.study.report as study
    from fedinspect.evaluation import document

    assert classification.Document is document.Document
    for module in (classification, privacy, run, study):
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert "<html" not in source.lower() and "class Document" not in source, module.__name__
