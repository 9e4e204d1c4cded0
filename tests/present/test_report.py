"""`fdsub report` / `fd.report`: one self-contained HTML file, escaped names, one-line errors, and a browser render."""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import netgen  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx.cli.main import app
from fdsub_onnx.evaluate.compare import compare_modes

HOSTILE_TENSOR = "<script>alert(1)</script>"
HOSTILE_NODE = '"><img src=x onerror=alert(2)>'
HOSTILE_IMAGE = "</script><!--img&'\"-->"
SIZE = 16
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "nav", "section", "h1", "h2", "h3", "h4",
                "p", "small", "sub", "code", "b", "br", "span", "a", "ul", "li", "div", "table", "caption", "thead",
                "tbody", "tr", "th", "td", "img", "figure", "figcaption", "button", "script"}


# ---- models and images -----------------------------------------------------------------------
def _blocked_net() -> onnx.ModelProto:
    """conv (ReLU) -> maxpool -> conv -> Softmax -> conv: two decodable Conv layers, one blocked by the Softmax."""
    b = netgen.NetBuilder(height=SIZE, width=SIZE, seed=5)
    first = b.conv("input", 4, 3, 1, (1, 1, 1, 1))
    second = b.conv(b.maxpool(b.relu(first), 2, 2), 4, 3, 1, (1, 1, 1, 1))
    b.conv(b._node("Softmax", [second], b.shapes[second], axis=1), 2, 3)
    return b.build()


def _hostile_net() -> onnx.ModelProto:
    """Conv -> Relu -> Conv where the first conv's node and output tensor (and the input) carry markup."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (3, 3, 3, 3)), ("w2", (2, 3, 3, 3)))]
    image = "in<put>&"
    nodes = [
        helper.make_node("Conv", [image, "w1"], [HOSTILE_TENSOR], name=HOSTILE_NODE, kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", [HOSTILE_TENSOR], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["out</b>"], name="second", kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(nodes, "hostile",
                              [helper.make_tensor_value_info(image, TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("out</b>", TensorProto.FLOAT, [1, 2, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.checker.check_model(model)
    return model


def _deep_net(convs: int = 10, channels: int = 17) -> onnx.ModelProto:
    """``convs`` 3x3 convs (ReLU between them) of ``channels`` each: more layers and neurons than the report samples."""
    b = netgen.NetBuilder(height=12, width=12, seed=7)
    x = "input"
    for index in range(convs):
        x = b.conv(x if index == 0 else b.relu(x), channels, 3, 1, (1, 1, 1, 1))
    return b.build()


def _images(count: int, size: int = SIZE, seed: int = 0, sources=None) -> fd.ArrayImages:
    array = np.random.default_rng(seed).uniform(0, 1, (count, 3, size, size)).astype(np.float32)
    return fd.ArrayImages(array, sources=sources)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-models")
    paths = {}
    for name, proto in (("blocked", _blocked_net()), ("hostile", _hostile_net()), ("deep", _deep_net())):
        paths[name] = folder / f"{name}.onnx"
        onnx.save(proto, str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """One report of the blocked net (neurons 0-2, top 4, hold-out of 6 images), with the progress it reported."""
    out = tmp_path_factory.mktemp("report") / "out"
    calls = []
    path = fd.report(fd.load_model(models["blocked"]), _images(10), out, neurons="0-2", top=4,
                     holdout=_images(6, seed=1), progress=lambda done, total: calls.append((done, total)))
    return path, path.read_text(encoding="utf-8"), calls


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


def _tags(page: str) -> list:
    """Every start tag of ``page`` as (name, [(attribute, value)]), as a browser's tokenizer sees them."""
    parser = _Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def _json_island(page: str) -> dict:
    found = re.search(r'<script type="application/json" id="fdsub-data">(.*?)</script>', page, re.DOTALL)
    assert found is not None
    return json.loads(found.group(1))


# ---- structure ---------------------------------------------------------------------------------
def test_report_is_one_self_contained_file(built):
    path, page, _ = built
    assert path.name == "index.html" and sorted(p.name for p in path.parent.iterdir()) == [".fdsub-result.json",
                                                                                          "index.html"]
    assert sorted(p.name for p in path.parent.parent.iterdir()) == ["out"]  # no temporary folder left
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://|<link\b|@import|url\((?!data:image/(png|jpeg);base64,)|<iframe|<object|<embed",
                         page, re.IGNORECASE)
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    sources = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert len(sources) > 30 and all(re.match(r"data:image/(png|jpeg);base64,", s) for s in sources)
    for source in sources[:: max(1, len(sources) // 20)]:  # a sample decodes as the image it says it is
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == source[len("data:image/") : source.index(";")].upper() and min(image.size) >= 1
    tags = _tags(page)
    assert {tag for tag, _ in tags} <= ALLOWED_TAGS, {tag for tag, _ in tags} - ALLOWED_TAGS
    assert [dict(attrs) for tag, attrs in tags if tag == "script"] == [
        {"type": "application/json", "id": "fdsub-data"}, {}]
    ids = set(re.findall(r'\bid="([^"]+)"', page))
    links = re.findall(r'\bhref="([^"]*)"', page)
    assert links and all(link.startswith("#") and link[1:] in ids for link in links)


def test_report_stores_each_picture_once(built):
    """Every data URI is one CSS class, and every picture box on the page shows a class that exists."""
    _, page, _ = built
    rules = dict(re.findall(r"\.(p\d+)\{background-image:url\(([^)]*)\)\}", page))
    uris = re.findall(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", page)
    assert rules and len(set(rules.values())) == len(rules)
    assert len(uris) == len(set(uris)), "a picture is stored twice"
    boxes = re.findall(r'<span class="pic (p\d+)[^"]*" role="img"', page)
    assert set(boxes) <= set(rules) and len(boxes) > 2 * len(rules)  # pictures shown in several places
    crops = re.findall(r'<span class="pic (p\d+) crop"', page)
    assert len(crops) == 2 * 6 * 4  # each instance: a patch in the table and one in the detail


def test_report_sections_details_and_summary(built, models):
    _, page, _ = built
    summary = fd.inspect_model(fd.load_model(models["blocked"]))
    convs = [layer for layer in summary.layers if layer.op == "Conv"]
    decodable = [layer.name for layer in convs if layer.decodable]
    blocked = [layer for layer in summary.layers if not layer.decodable]
    assert len(decodable) == 2 and blocked and "Softmax" in blocked[0].reason
    assert re.findall(r'<section class="layer" id="(L\d+)"', page) == ["L0", "L1"]
    for index, name in enumerate(decodable):
        assert f'<h2>{html.escape(name)} <small>Conv' in page
        for neuron in range(3):
            assert page.count(f'id="L{index}-n{neuron}"') == 1 and f'href="#L{index}-n{neuron}"' in page
        assert f'id="L{index}-n3"' not in page  # --neurons 0-2
    assert page.count('<div class="detail"') == 6
    assert page.count("<figure class=\"instance\">") == 6 * 4  # top 4 instances of each neuron
    section = page[page.index('id="summary"'):page.index('id="L0"')]
    for layer in summary.layers:
        assert html.escape(layer.name) in section
    assert html.escape(blocked[0].reason) in section
    assert f"{len(summary.layers) - len(blocked)} of {len(summary.layers)} layers decodable" in section
    for mode in ("fds", "weights", "local"):
        assert f'data-mode="{mode}"' in page
    assert "fidelity on 6 images" in page  # the hold-out, not the 10 images


def test_report_figures_match_the_library(built, models):
    """The embedded data and the table cells carry the library's numbers; conv1 (before the ReLU) is linear."""
    _, page, _ = built
    data = _json_island(page)
    assert [entry["layer"] for entry in data["layers"]] == [layer["name"] for layer in data["summary"]["layers"]
                                                            if layer["op"] == "Conv" and layer["decodable"]]
    first = data["layers"][0]
    assert first["neurons"] == [0, 1, 2]
    assert set(first["fidelity"]["decodings"]) == {"weights", "fds", "local", "deconvnet", "nf"}
    np.testing.assert_allclose(first["fidelity"]["decodings"]["weights"]["correlation"], 1.0, atol=1e-6)
    model = fd.load_model(models["blocked"])
    top = fd.capture_top(model, first["layer"], _images(10), top=4, neurons=[0, 1, 2])
    want = np.where(top.image_index >= 0, top.values.astype(np.float64), np.nan).mean(axis=1)
    np.testing.assert_allclose(first["mean_top_activation"], want, rtol=1e-6)
    table = page[page.index('<table class="neurons'):]
    cells = re.findall(r'<td class="num" data-v="([^"]*)">', table[: table.index("</table>")])
    assert len(cells) == 3 * 6  # mean activation and 5 correlations per neuron
    np.testing.assert_allclose(float(cells[0]), want[0], rtol=1e-9)
    np.testing.assert_allclose(float(cells[1]), 1.0, atol=1e-6)
    means = page[page.index('<table class="means"'):]
    means = means[: means.index("</table>")]
    assert "two-choice" in means and "degenerate" in means
    weights = re.search(r"<tr><td>weights</td>((?:<td[^>]*>[^<]*</td>){4})</tr>", means).group(1)
    shown = re.findall(r'data-v="([^"]*)"', weights)
    assert float(shown[2]) == first["fidelity"]["decodings"]["weights"]["mean_two_choice"] and shown[3] == "0"


def test_report_opens_on_the_decoding_the_benchmark_ranks_best(built):
    from fdsub_onnx.defaults import BENCHMARK_RANKING

    best = next(mode for mode in BENCHMARK_RANKING if mode in ("fds", "weights", "local"))
    assert f'data-show="{best}"' in built[1] and f'data-mode="{best}" class=on' in built[1]


def test_report_progress_reaches_the_end(built):
    _, _, calls = built
    totals = {total for _, total in calls}
    assert len(totals) == 1 and calls[-1][0] == calls[-1][1]
    done = [d for d, _ in calls]
    assert len(done) > 10 and all(b >= a - 1e-9 for a, b in itertools.pairwise(done))


def test_report_escapes_hostile_names(models, tmp_path):
    sources = [HOSTILE_IMAGE + str(i) for i in range(6)]
    path = fd.report(models["hostile"], _images(6, 12, sources=sources), tmp_path / "r", top=3)
    page = path.read_text(encoding="utf-8")
    for raw in (HOSTILE_TENSOR, HOSTILE_NODE, HOSTILE_IMAGE, "in<put>&", "out</b>"):
        assert raw not in page, raw
    assert html.escape(HOSTILE_TENSOR) in page and html.escape(HOSTILE_NODE) in page
    assert html.escape(HOSTILE_IMAGE) in page and html.escape("out</b>") in page
    assert len(re.findall(r"<script\b", page)) == 2 and page.count("</script>") == 2  # the JSON and the JS only
    tags = _tags(page)
    assert not [(tag, name) for tag, attrs in tags for name, _ in attrs if name.startswith("on")]
    assert all(tag != "img" or dict(attrs)["src"].startswith("data:image/png;base64,") for tag, attrs in tags)
    data = _json_island(page)
    assert data["layers"][0]["layer"] == HOSTILE_TENSOR and data["summary"]["layers"][0]["node"] == HOSTILE_NODE


def test_report_layers_and_neurons_options(models, tmp_path):
    model = fd.load_model(models["blocked"])
    second = [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv"][1]
    page = fd.report(model, _images(3), tmp_path / "r", layers=second, neurons=[3], top=5).read_text(encoding="utf-8")
    assert re.findall(r'<section class="layer" id="(L\d+)"', page) == ["L0"]
    assert f"<h2>{html.escape(second)} " in page and page.count('<div class="detail"') == 1 and 'id="L0-n3"' in page
    assert page.count('<figure class="instance">') == 3  # fewer images than --top: the slots left are not shown
    assert ">top 3 patches</th>" in page  # and the column says how many it shows (it said "top 5")


# ---- what a report shows by default ---------------------------------------------------------------
def _convs(model) -> list[str]:
    return [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv" and layer.decodable]


def test_default_report_samples_layers_spread_over_the_depth_and_16_neurons(models):
    model = fd.load_model(models["deep"])
    convs = _convs(model)
    assert len(convs) == 10 and (fd.REPORT_LAYERS, fd.REPORT_NEURONS) == (6, 16)
    choice = fd.choose_report(model)
    names = [layer.name for layer in choice.layers]
    assert names == [convs[i] for i in (0, 2, 4, 5, 7, 9)]  # the first, the deepest, evenly spaced between
    assert choice.candidates == 10 and [pick.tolist() for pick in choice.picks] == [list(range(16))] * 6
    assert choice.note == (f"report of 6 of 10 decodable Conv layers ({', '.join(names)}) x neurons 0-15 of each; "
                           "--layers all --neurons all for every one")


def test_report_keywords_all_give_every_layer_and_neuron(models):
    model = fd.load_model(models["deep"])
    convs = _convs(model)
    every = fd.choose_report(model, layers="all", neurons="all")
    assert [layer.name for layer in every.layers] == convs and every.note is None
    assert [pick.tolist() for pick in every.picks] == [list(range(17))] * 10
    layers_all = fd.choose_report(model, layers="all")
    assert len(layers_all.layers) == 10 and all(len(pick) == 16 for pick in layers_all.picks)
    assert layers_all.note == ("report of all 10 decodable Conv layers x neurons 0-15 of each; "
                               "--neurons all for every one")
    neurons_all = fd.choose_report(model, neurons="all")
    assert len(neurons_all.layers) == 6 and all(len(pick) == 17 for pick in neurons_all.picks)
    assert neurons_all.note.endswith("; --layers all for every one") and "neurons 0-15" not in neurons_all.note
    named = fd.choose_report(model, layers=f"{convs[3]},{convs[1]}")
    assert [layer.name for layer in named.layers] == [convs[1], convs[3]]
    assert named.note == "report of 2 named layers x neurons 0-15 of each; --neurons all for every one"
    assert fd.choose_report(model, layers=convs[1], neurons="0-2").note is None


def test_report_of_a_small_model_shows_every_layer(models):
    """Fewer decodable layers than REPORT_LAYERS, fewer neurons than REPORT_NEURONS: all of them, nothing said."""
    model = fd.load_model(models["blocked"])
    choice = fd.choose_report(model)
    assert [layer.name for layer in choice.layers] == _convs(model)
    assert [pick.tolist() for pick in choice.picks] == [[0, 1, 2, 3]] * 2 and choice.note is None


@pytest.mark.parametrize("count", [1, 2, 3, 5, 6, 7, 10, 13, 81])
def test_layer_sample_is_evenly_spread(count):
    from fdsub_onnx.evaluate.compare import spread

    picked = spread(count, 6)
    assert len(picked) == min(count, 6) and picked[0] == 0 and picked[-1] == count - 1
    gaps = np.diff(picked)
    assert (gaps >= 1).all() and (len(gaps) == 0 or gaps.max() - gaps.min() <= 1)


def test_report_with_every_layer_and_neuron(models, tmp_path):
    """``layers="all", neurons="all"``: the report of every decodable Conv layer and neuron, as before the sample."""
    model = fd.load_model(models["deep"])
    notes = []
    page = fd.report(model, _images(4, 12), tmp_path / "r", layers="all", neurons="all", top=1,
                     note=notes.append).read_text(encoding="utf-8")
    assert re.findall(r'<section class="layer" id="(L\d+)"', page) == [f"L{i}" for i in range(10)]
    assert page.count('<div class="detail"') == 10 * 17 and 'class="sample"' not in page
    assert _json_island(page)["setup"]["sample"] is None and notes == []


@pytest.mark.parametrize("case", ["blocked_layer", "not_a_layer", "neurons_out_of_range", "top_zero", "out_is_file"])
def test_report_api_errors(models, tmp_path, case):
    model = fd.load_model(models["blocked"])
    names = [layer.name for layer in fd.inspect_model(model).layers]
    (tmp_path / "file").write_text("x")
    kwargs = {
        "blocked_layer": {"layers": names[-1]},
        "not_a_layer": {"layers": "nope"},
        "neurons_out_of_range": {"neurons": "9"},
        "top_zero": {"top": 0},
        "out_is_file": {"out": tmp_path / "file"},
    }[case]
    out = kwargs.pop("out", tmp_path / "new" / "r")
    with pytest.raises(fd.FdsubError):
        fd.report(model, _images(4), out, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_report_scores_fidelity_on_an_evenly_spaced_sample(models, tmp_path):
    """``fidelity_images``: the figures of a sample of the fidelity set (first and last image included) are those of
    ``fidelity`` on those images, and the page and ``note`` say so; ``"all"`` scores every image."""
    model = fd.load_model(models["blocked"])
    images, held = _images(8), _images(7, seed=1)
    notes = []
    page = fd.report(model, images, tmp_path / "a", neurons="0-1", top=2, holdout=held, fidelity_images=3,
                     note=notes.append).read_text(encoding="utf-8")
    sample = "fidelity scored on 3 of the 7 images, evenly spaced; --fidelity-images all for every one"
    assert sample in notes and html.escape(sample) in page
    island = _json_island(page)
    assert island["setup"]["fidelity_sample"] == sample
    assert {layer["fidelity"]["images"] for layer in island["layers"]} == {3}
    chosen = fd.ArrayImages(held.array[[0, 3, 6]])
    layer = island["layers"][0]
    compared = compare_modes(model, layer["layer"], images, chosen, top=2, neurons="0-1")
    assert compared.scores["decodings"]["weights"] == layer["fidelity"]["decodings"]["weights"]
    page = fd.report(model, images, tmp_path / "b", neurons="0-1", top=2, holdout=held, fidelity_images="all",
                     note=notes.append).read_text(encoding="utf-8")
    assert {layer["fidelity"]["images"] for layer in _json_island(page)["layers"]} == {7}
    assert _json_island(page)["setup"]["fidelity_sample"] is None


# ---- command line --------------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("FDSUB_DEBUG", raising=False)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_report_writes_index(models, tmp_path):
    out = tmp_path / "rep"
    result = invoke("report", models["blocked"], "--images", "builtin:blobs:6", "--neurons", "0", "--top", "2",
                    "--preset", "torchvision", "--holdout", "builtin:gratings:5", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count(str(out / "index.html")) == 1  # `make demo` names the report once
    assert sorted(p.name for p in out.iterdir()) == [".fdsub-result.json", "index.html"]
    assert "fidelity on 5 images" in (out / "index.html").read_text(encoding="utf-8")


def test_cli_report_default_sample_says_what_it_picked(models, tmp_path):
    out = tmp_path / "rep"
    result = invoke("report", models["deep"], "--images", "builtin:blobs:4", "--top", "1", "--out", out)
    assert result.exit_code == 0, result.output
    want = fd.choose_report(fd.load_model(models["deep"])).note
    assert [line for line in result.stderr.splitlines() if "report of" in line] == [f"note: {want}"]
    assert "--layers all --neurons all" not in result.stdout
    page = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r'<section class="layer" id="(L\d+)"', page) == [f"L{i}" for i in range(6)]
    assert page.count('<div class="detail"') == 6 * 16
    assert f'<p class="sample">{html.escape("R" + want[1:])}.</p>' in page
    assert _json_island(page)["setup"]["sample"] == want


BAD = {
    "missing_model": (["MISSING", "--images", "builtin:blobs:4"], "not found"),
    "bad_images": (["MODEL", "--images", "nowhere/"], "no such file"),
    "bad_holdout": (["MODEL", "--images", "builtin:blobs:4", "--holdout", "builtin:nothing"], "builtin"),
    "unknown_layer": (["MODEL", "--images", "builtin:blobs:4", "--layers", "conv_99"], "no layer"),
    "blocked_layer": (["MODEL", "--images", "builtin:blobs:4", "--layers", "LAST"], "not decodable"),
    "neurons_out_of_range": (["MODEL", "--images", "builtin:blobs:4", "--neurons", "4-9"], "out of range"),
    "neurons_text": (["MODEL", "--images", "builtin:blobs:4", "--neurons", "a"], "0,5,10-20"),
    "top_zero": (["MODEL", "--images", "builtin:blobs:4", "--top", "0"], "top"),
    "bad_preset": (["MODEL", "--images", "builtin:blobs:4", "--preset", "nope"], "preset"),
    "bad_select": (["MODEL", "--images", "builtin:blobs:4", "--select", "most"], "select"),
    "fidelity_images_zero": (["MODEL", "--images", "builtin:blobs:4", "--fidelity-images", "0"], "fidelity-images"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_input_is_one_line_and_writes_nothing(models, tmp_path, case):
    args, fragment = BAD[case]
    last = [layer.name for layer in fd.inspect_model(fd.load_model(models["blocked"])).layers][-1]
    args = [{"MODEL": models["blocked"], "MISSING": tmp_path / "missing.onnx", "LAST": last}.get(a, a) for a in args]
    out = tmp_path / "results" / "rep"
    result = invoke("report", *args, "--out", out)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0].lower() and "Traceback" not in result.output
    assert not out.parent.exists()


def test_cli_out_is_a_file(models, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file")
    result = invoke("report", models["blocked"], "--images", "builtin:blobs:4", "--out", out)
    assert result.exit_code == 2 and "is a file" in result.output and out.read_text() == "a file"


# ---- in a browser --------------------------------------------------------------------------------
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the browser checks need it")
    return found


def _run_chromium(*args) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          check=False, capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(built, tmp_path):
    path = built[0]
    shot = tmp_path / "shot.png"
    _run_chromium(f"--screenshot={shot}", "--window-size=1280,2000", path.as_uri())
    assert shot.is_file(), "Chromium wrote no screenshot"
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        pixels = np.asarray(image.convert("RGB"), np.float64)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    not_white = np.mean(pixels.min(axis=2) < 235)
    assert pixels.std() > 20 and colours > 200 and not_white > 0.05, (pixels.std(), colours, not_white)


def test_report_scripts_sort_and_switch_in_chromium(built, tmp_path):
    """Click 'mean act.' of the first layer twice (descending, then ascending) and the 'weights' tab; read the DOM."""
    page = built[1]
    clicks = """<script>
var table = document.querySelector('#L0 table.neurons'), th = table.tHead.rows[0].cells[5];
th.click(); var first = Array.from(table.tBodies[0].rows).map(function (r) { \
return r.cells[5].getAttribute('data-v'); });
th.click(); var second = Array.from(table.tBodies[0].rows).map(function (r) { \
return r.cells[5].getAttribute('data-v'); });
document.querySelector('#L0 .tabs button[data-mode=weights]').click();
document.title = JSON.stringify({desc: first, asc: second, \
show: document.querySelector('#L0').getAttribute('data-show'),
  shown: getComputedStyle(document.querySelector('#L0 td .m-weights')).display,
  hidden: getComputedStyle(document.querySelector('#L0 td .m-fds')).display});
</script>"""
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", clicks + "</body>"), encoding="utf-8")
    result = _run_chromium("--dump-dom", probe.as_uri())
    found = re.search(r"<title>(.*?)</title>", result.stdout, re.DOTALL)
    assert found is not None, result.stderr[-2000:]
    state = json.loads(html.unescape(found.group(1)))
    desc, asc = ([float(v) for v in state[key]] for key in ("desc", "asc"))
    assert desc == sorted(desc, reverse=True) and asc == sorted(asc) and len(desc) == 3 and desc != asc
    assert state["show"] == "weights" and state["shown"] != "none" and state["hidden"] == "none"


def test_report_patches_show_the_receptive_field_in_chromium(built, tmp_path):
    """The detail view's patches are cut out of the stored source image by CSS: rendered, each magnified image
    pixel is the image's pixel in the receptive field the caption names (dark gray outside the image)."""
    page = built[1]
    images = _images(10).array
    figures = re.findall(r'<figure class="instance">.*?</figure>', page, re.DOTALL)
    picked = figures[:: max(1, len(figures) // 4)][:4]
    probe_body = "".join(f'<div style="height:{SIZE * 10}px">'
                         f'{re.search(r"<span class=.pic p[0-9]+ crop.*?</span>", f).group(0)}</div>'
                         for f in picked)
    head = page[: page.index("<body>")]
    probe = tmp_path / "patches.html"
    probe.write_text(head + '<body style="margin:0">' + probe_body + "</body></html>", encoding="utf-8")
    shot = tmp_path / "patches.png"
    _run_chromium(f"--screenshot={shot}", f"--window-size=800,{SIZE * 10 * len(picked)}", probe.as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"), np.float64)
    for row, figure in enumerate(picked):
        index = int(re.search(r'title="array\[(\d+)\]"', figure).group(1))
        y0, y1, x0, x1 = (int(v) for v in re.search(r"rows (-?\d+)&ndash;(-?\d+), columns (-?\d+)&ndash;(-?\d+)",
                                                    figure).groups())
        width = int(re.search(r'crop" role="img" aria-label="patch" style="width:(\d+)px', figure).group(1))
        scale = width // (x1 - x0 + 1)
        want = np.full((y1 - y0 + 1, x1 - x0 + 1, 3), 60.0)
        rgb = np.rint(images[index].transpose(1, 2, 0) * 255)
        ya, yb, xa, xb = max(y0, 0), min(y1 + 1, SIZE), max(x0, 0), min(x1 + 1, SIZE)
        want[ya - y0 : yb - y0, xa - x0 : xb - x0] = rgb[ya:yb, xa:xb]
        centres = (np.arange(want.shape[0]) * scale + scale // 2, np.arange(want.shape[1]) * scale + scale // 2)
        got = pixels[row * SIZE * 10 :][np.ix_(*centres)]
        assert scale >= 2 and np.abs(got - want).mean() < 12, (row, np.abs(got - want).mean())


def test_small_numbers_keep_their_digits():
    from fdsub_onnx.present.report import _fmt

    assert [_fmt(v) for v in (0.25, 1.4970e-4, -2e-7, 0.0, 12.3456, float("nan"))] == \
        ["0.250", "0.00015", "-2e-07", "0.000", "12.346", "&ndash;"]


def test_large_filters_are_stored_small():
    """Deep layers' filters (receptive fields of hundreds of px) are stored at FILTER_MAX px and block-averaged
    to GRID_SIDE px in the grids, so a report's size does not grow with the receptive field."""
    from fdsub_onnx.present.report import FILTER_MAX, GRID_SIDE, _block_mean, _filter_image

    filters = np.random.default_rng(0).standard_normal((2, 3, 250, 130))
    assert max(_filter_image(filters[0]).size) == FILTER_MAX
    small = _block_mean(filters, GRID_SIDE)
    assert small.shape == (2, 3, 63, 33)  # blocks of 4: 250 and 130 padded to 252 and 132
    np.testing.assert_allclose(small[1, 2, 5, 7], filters[1, 2, 20:24, 28:32].mean())
    np.testing.assert_allclose(small[0, 0, -1, -1], filters[0, 0, 248:, 128:].sum() / 16)  # the zero padding counts
    fits = filters[:, :, :GRID_SIDE, :40]
    assert _block_mean(fits, GRID_SIDE) is fits


def test_layers_too_large_for_the_memory_left(models, tmp_path, monkeypatch):
    """By default the layers that no route decodes in the memory left are left out (page and note);
    named layers that do not fit stop the report before any work, with the decoder's one-line reason."""
    from fdsub_onnx.compose.backend import NumpyBackend, get_backend
    from fdsub_onnx.compose.engine import Engine
    from fdsub_onnx.compose.inspect import MEMORY_MARGIN
    from fdsub_onnx.compose.walker import walk

    model = fd.load_model(models["blocked"])
    convs = [layer.name for layer in fd.inspect_model(model).layers if layer.op == "Conv" and layer.decodable]

    def need(targets):
        usage = {}
        for _ in walk(model, Engine(get_backend("numpy"), "float32", "fast"), targets=targets, usage=usage):
            pass
        return usage["peak"] * MEMORY_MARGIN

    first, both = need(convs[:1]), need(convs)
    assert first < both
    monkeypatch.setattr(NumpyBackend, "free_bytes", lambda self: int((first + both) / 2))
    notes = []
    page = fd.report(model, _images(6), tmp_path / "r", neurons="0-1", top=2, note=notes.append).read_text("utf-8")
    assert re.findall(r'<section class="layer" id="(L\d+)"', page) == ["L0"]
    assert "too large to decode in the memory left" in page and html.escape(convs[1]) in page
    assert _json_island(page)["setup"]["left_out"] == [convs[1]]
    assert len(notes) == 1 and convs[1] in notes[0]
    with pytest.raises(fd.FdsubError, match="does not fit in the memory budget of "):
        fd.report(model, _images(6), tmp_path / "named", layers=convs, top=2)
    assert not (tmp_path / "named").exists()


def test_a_neurons_top_patches_and_card_are_one_call(tmp_path):
    """`fd.patch_grid` cuts each top instance's receptive field from its image as the model saw it (issue 28: the
    report's cropping was private); `fd.neuron_card` puts the decoded filter beside them."""
    model = fd.load_model(str(Path(__file__).resolve().parents[2] / "models" / "demo.onnx"))
    images = fd.open_images("builtin:glyphs:32", model.input_shape[1:])
    top = fd.capture_top(model, "conv2", images, top=4, neurons="0-1")
    grid = fd.patch_grid(model, top, images, 1, cell=24)
    card = fd.neuron_card(model, fd.decode(model, "conv2", neurons="0-1"), top, images, 1, cell=24)
    assert grid.width >= 2 * 24 and card.width > grid.width and card.height >= grid.height
    with pytest.raises(fd.FdsubError, match="neuron 7 is not in this top-N result"):
        fd.patch_grid(model, top, images, 7)
