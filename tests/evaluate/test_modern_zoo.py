"""The modern acceptance zoo: models/zoo-modern.toml over the skeletons in models/modern/.

The skeletons are torch (TorchScript and dynamo exporter) and tf2onnx-style exports of current CNNs with their
float weights stripped (models/build_modern_zoo.py --skeleton); every test re-randomizes them with the entry's
seed. Checked here: every zoo entry passes every check of ``fdsub check`` (a); the share of convolution-like
layers that decode (b); quantized copies (onnxruntime.quantization: QDQ, QOperator, dynamic) decode like the
float model (c);
``local`` mode's per-instance identity on a squeeze-and-excitation network against onnxruntime (d); every mode
on a dynamo export behind an SE gate (e).
About 60 s on 2 cores; FDSUB_LONG=1 adds a deeper identity run over every model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from quantize import QUANTIZED, quantize

import fdsub_onnx
from fdsub_onnx.evaluate.zoo import ZooResult, check_zoo_model, randomized
from fdsub_onnx.graph.model import CONV_LIKE, as_map
from fdsub_onnx.graph.randomize import FLOAT_TYPES

ROOT = Path(__file__).resolve().parents[2]
ZOO = ROOT / "models" / "zoo-modern.toml"
SKELETONS = ROOT / "models" / "modern"
MODELS = {m.name: m for m in fdsub_onnx.read_zoo(ZOO)}
LONG = os.environ.get("FDSUB_LONG") == "1"
SKELETON_KEEP = 16  # build_modern_zoo.SKELETON_KEEP: float initializers up to this size keep their data
MAX_BYTES = 3_500_000  # the committed skeletons, all together (25 files: 3.0 MB)
#: architectures whose two exports (TorchScript and dynamo) write graphs that differ where the rules care
BOTH_EXPORTERS = ("mobilenet_v3_large", "efficientnet_b0", "shufflenet_v2_x1_0", "convnext_tiny", "yolo_toy",
                  "yolo_psa")
QDQ_MODEL, QDQ_MAX_RF, QDQ_TOLERANCE = "mobilenet_v2.ts", 64, 0.05
LOCAL_MODEL = "mobilenet_v3_large.ts"
LOCAL_LAYER = "/features/features.5/block/block.3/block.3.0/Conv_output_0"  # behind the SE gates of blocks 4, 5
DYNAMO_MODEL, DYNAMO_GATE = "mobilenet_v3_large.dynamo", "mul"  # its first SE gate (features.4.block.2)
DYNAMO_LAYER = "getitem_33"  # features.4.block.3.1, the projection conv behind that gate


@functools.cache
def zoo_result(name: str) -> ZooResult:
    """``fdsub zoo`` on entry ``name`` (run once, shared by the tests that read its report)."""
    [result] = fdsub_onnx.run_zoo([MODELS[name]])
    return result


def load_randomized(name: str, folder: Path) -> tuple[Path, fdsub_onnx.Model]:
    """Zoo entry ``name`` re-randomized with its seed, saved in ``folder`` and loaded."""
    entry = MODELS[name]
    path = folder / f"{name}.onnx"
    onnx.save(randomized(entry.path, entry.seed), str(path))
    return path, fdsub_onnx.load_model(path, entry.input_shape)


def images_of(model: fdsub_onnx.Model, count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *model.input_shape[1:]), dtype=np.float32)


# ---- the zoo file and its skeletons ---------------------------------------------------------------------
def test_zoo_lists_every_skeleton_and_randomizes_it():
    paths = {Path(m.path).resolve() for m in MODELS.values()}
    assert paths == {p.resolve() for p in SKELETONS.glob("*.onnx")}, "every skeleton in models/modern/, once"
    assert all(m.randomize for m in MODELS.values()), "skeletons load only re-randomized"
    assert all(m.options["tolerance"] == 1e-4 for m in MODELS.values())
    for arch in BOTH_EXPORTERS:
        assert {f"{arch}.ts", f"{arch}.dynamo"} <= set(MODELS), arch
    size = sum(p.stat().st_size for p in SKELETONS.glob("*.onnx"))
    print(f"\nmodels/modern/: {len(paths)} skeletons, {size / 1e6:.2f} MB")
    assert size < MAX_BYTES


@pytest.mark.parametrize("name", list(MODELS))
def test_skeleton_keeps_the_graph_without_weights(name):
    """The float weights of more than ``SKELETON_KEEP`` values are stripped, smaller ones keep their values: the
    initializers, or in a graph that holds its weights in Constant nodes (paddle2onnx), those nodes' tensors."""
    proto = onnx.load(MODELS[name].path)
    constants = [a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    held = proto.graph.initializer if any(t.data_type in FLOAT_TYPES for t in proto.graph.initializer) else constants
    float_inits = [t for t in held if t.data_type in FLOAT_TYPES]
    big = [t for t in float_inits if int(np.prod(t.dims)) > SKELETON_KEEP]
    assert big and proto.graph.node
    assert not [t.name for t in big if t.raw_data or t.float_data or t.double_data], "weights left in"
    small = [t for t in float_inits if int(np.prod(t.dims)) <= SKELETON_KEEP]
    assert all(t.raw_data or t.float_data or t.double_data for t in small), "small constants keep their values"


def test_randomized_redraws_weights_written_as_constant_nodes():
    """paddle2onnx writes each weight as a Constant node: ``randomized`` redraws those a skeleton stripped where
    they stand and keeps the small ones (HardSwish's 3 and 6, an epsilon) as written."""
    proto = onnx.load(MODELS["ppocrv4_rec.paddle"].path)
    filled = randomized(proto, seed=20)
    before = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    after = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in filled.graph.node
             if n.op_type == "Constant"}
    assert before.keys() == after.keys() and not filled.graph.initializer
    big = [name for name, t in before.items() if t.data_type in FLOAT_TYPES and np.prod(t.dims) > SKELETON_KEEP]
    assert len(big) > 100 and all(after[name].shape == tuple(before[name].dims) and after[name].std() > 0
                                  for name in big)
    small = [name for name, t in before.items() if t.data_type in FLOAT_TYPES and np.prod(t.dims) <= SKELETON_KEEP]
    assert small and all(np.array_equal(after[name], onnx.numpy_helper.to_array(before[name])) for name in small)
    onnx.checker.check_model(filled)


# ---- (a) every entry passes every check -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_model_passes_every_check(name):
    entry = MODELS[name]
    result = zoo_result(name)
    assert result.error is None, f"{name}: {result.error}"
    report = result.report
    checks = {c.name: c for c in report.checks}
    identity = checks["identity"]
    print(f"\n{name}: {report.decodable}/{report.layers} layers, identity {identity.value:.1e}, "
          f"sampled {len(report.sampled)}, {result.seconds:.1f} s")
    failed = [f"{c.name}: {c.summary} ({'; '.join(c.details[:4])})" for c in report.checks if c.failed]
    assert not failed, f"{name}: {failed}"
    assert report.status == "pass"
    # the checks that need sampled layers really ran
    assert len(report.sampled) == entry.options["sample"], report.sampled
    assert all(checks[c].status == "pass" for c in ("identity", "degenerate-filters", "dead-neurons"))
    assert identity.value <= 1e-4
    assert report.decodable / report.layers >= entry.options["min_coverage"]
    if entry.baseline is not None:  # the release gate against its baseline ran and passed
        assert result.diff is not None and result.diff.layers and result.diff.status == "pass", result.diff


# ---- (b) convolution-like layers ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_conv_like_layers_decode(name):
    """Every Conv-like node of the graph is a layer of ``inspect``, and every one decodes (after an upsampling: per
    position)."""
    report = zoo_result(name).report
    assert report is not None, zoo_result(name).error
    total = sum(node.op_type in CONV_LIKE for node in onnx.load(MODELS[name].path).graph.node)
    blocked = [lay for lay in report.blocked if lay["op"] in CONV_LIKE]
    share = (total - len(blocked)) / total if total else 0.0
    print(f"\n{name}: {total - len(blocked)}/{total} Conv-like layers decodable")
    reasons = sorted({lay["reason"] for lay in blocked})
    assert total and share == 1.0, f"{name}: {share:.3f}; blocked by {reasons}"


# ---- (c) a QDQ-quantized copy decodes like the float model ------------------------------------------------
@pytest.mark.parametrize("fmt", list(QUANTIZED))
def test_quantized_copy_decodes_like_the_float_model(fmt, tmp_path):
    """QDQ (folded weights, cancelling pairs), QOperator and dynamic quantization (rewritten to float ops at
    load, graph.dequantize): every conv decodes, to the float model's filters within the weights' quantization
    error; local mode runs on the rewritten copy."""
    source, float_model = load_randomized(QDQ_MODEL, tmp_path)
    quantize(source, tmp_path / f"{fmt}.onnx", fmt)
    proto = onnx.load(str(tmp_path / f"{fmt}.onnx"))
    ops, rewritten = QUANTIZED[fmt]
    assert ops <= {n.op_type for n in proto.graph.node}
    assert any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in proto.graph.initializer)
    quantized = fdsub_onnx.load_model(tmp_path / f"{fmt}.onnx")
    summary = fdsub_onnx.inspect_model(quantized)
    assert bool(summary.dequantized) == rewritten and bool(summary.to_json()["dequantized"]) == rewritten
    float_convs = [lay for lay in fdsub_onnx.inspect_model(float_model).layers if lay.op == "Conv"]
    convs = [lay for lay in summary.layers if lay.op == "Conv"]
    assert len(convs) == len(float_convs) == 52
    assert [lay.name for lay in convs if not lay.decodable] == []
    # the quantizers rename the outputs of Conv + Clip pairs; the projection convs keep their names
    names = {lay.name for lay in float_convs}
    common = [lay for lay in convs if lay.name in names and max(lay.receptive_field) <= QDQ_MAX_RF]
    assert len(common) >= 3
    for lay in (common[0], common[len(common) // 2], common[-1]):
        neurons = [0, lay.channels // 2, lay.channels - 1]
        want = fdsub_onnx.decode(float_model, lay.name, neurons=neurons, mode="weights", dtype="float64")
        got = fdsub_onnx.decode(quantized, lay.name, neurons=neurons, mode="weights", dtype="float64")
        assert got.filters.shape == want.filters.shape
        assert np.array_equal(got.stride, want.stride) and np.array_equal(got.origin, want.origin)
        diff, scale = np.abs(got.filters - want.filters).max(), np.abs(want.filters).max()
        print(f"\n{fmt} {lay.name}: rf {lay.receptive_field}, max |quantized - float| = {diff / scale:.2%} of max "
              "|filter|")
        assert 0 < diff <= QDQ_TOLERANCE * scale, lay.name  # int8 weights: close, but not the float filter
    local = fdsub_onnx.decode(quantized, common[1].name, neurons=[0, 1], mode="local", top=2,
                              images=fdsub_onnx.ArrayImages(images_of(quantized, 4, seed=3)))
    assert local.filters.shape[:2] == (2, 3) and np.isfinite(local.filters).all()


# ---- (d) local mode on a squeeze-and-excitation network ----------------------------------------------------
def test_local_instances_hold_the_identity_behind_se_gates(tmp_path):
    path, model = load_randomized(LOCAL_MODEL, tmp_path)
    held = [h["tensor"] for h in fdsub_onnx.inspect_model(model).held]
    assert any("features.4/" in t for t in held) and any("features.5/" in t for t in held), held
    images = fdsub_onnx.open_images("builtin:blobs:6", model.input_shape[1:])
    array = np.concatenate([batch for _, batch in images.batches(len(images))])
    decoded = fdsub_onnx.decode(model, LOCAL_LAYER, neurons=[0, 12], mode="local", images=images, top=2,
                                per_instance=True)
    proto = onnx.load(str(path))
    proto.graph.output.append(helper.make_empty_tensor_value_info(LOCAL_LAYER))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    act = np.concatenate([session.run([LOCAL_LAYER], {model.input_name: array[i:i + 1]})[0]
                          for i in range(len(array))])
    found, (ry, rx) = decoded.instances, decoded.receptive_field
    assert decoded.instance_filters.shape == (2, 2, 3, ry, rx) and (found.image_index >= 0).all()
    padded = np.pad(array.astype(np.float64), ((0, 0), (0, 0), (ry, ry), (rx, rx)))  # the zero-extended image
    corner = decoded.geometry.corner(found.position) + np.array([ry, rx])
    scale = np.abs(act[:, decoded.neurons]).max()
    for k, neuron in enumerate(decoded.neurons):
        for n in range(found.top):
            i, (y0, x0), (qy, qx) = found.image_index[k, n], corner[k, n], found.position[k, n]
            pred = (decoded.instance_filters[k, n] * padded[i, :, y0:y0 + ry, x0:x0 + rx]).sum()
            pred += decoded.instance_bias[k, n]
            assert abs(pred - act[i, neuron, qy, qx]) <= 1e-3 * scale, (k, n, pred, act[i, neuron, qy, qx])


# ---- (e) every mode on a dynamo export with squeeze-and-excitation gates ---------------------------------------
def test_every_mode_runs_on_a_dynamo_export_behind_se_gates(tmp_path):
    """weights (the gate held), fds, local, deconvnet, nf, fidelity and report on the dynamo export of
    mobilenet_v3_large (SE pools written as ReduceMean), at a layer behind its first SE gate."""
    _, model = load_randomized(DYNAMO_MODEL, tmp_path)
    assert DYNAMO_GATE in {h["tensor"] for h in fdsub_onnx.inspect_model(model).held}
    images = fdsub_onnx.ArrayImages(images_of(model, 6, seed=4))
    shape = (2, 3, *fdsub_onnx.layer_geometry(model, DYNAMO_LAYER).rf)
    for mode in ("weights", "fds", "local", "deconvnet"):
        decoded = fdsub_onnx.decode(model, DYNAMO_LAYER, neurons=[0, 5], mode=mode, top=2,
                                    images=None if mode == "weights" else images)
        assert decoded.filters.shape == shape and np.isfinite(decoded.filters).all(), mode
        assert np.abs(decoded.filters).max() > 0, mode
    assert DYNAMO_GATE in fdsub_onnx.decode(model, DYNAMO_LAYER, neurons=[0]).gates
    top = fdsub_onnx.capture_top(model, DYNAMO_LAYER, images, top=2, neurons="0,5")
    nf = fdsub_onnx.neuron_feature(model, top, images).filters
    assert nf.shape == shape and np.isfinite(nf).all()
    scores = fdsub_onnx.compare_modes(model, DYNAMO_LAYER, images, images, top=2, neurons="0,5").scores
    assert set(scores["decodings"]) == set(fdsub_onnx.FIDELITY_MODES)
    page = fdsub_onnx.report(model, images, tmp_path / "report", layers=DYNAMO_LAYER, neurons="0", top=2)
    assert page.exists() and DYNAMO_LAYER in page.read_text()


# ---- FDSUB_LONG=1: a deeper identity run ------------------------------------------------------------------
@pytest.mark.skipif(not LONG, reason="set FDSUB_LONG=1 (about 45 s more on 2 cores)")
@pytest.mark.parametrize("name", list(MODELS))
def test_model_identity_on_more_layers(name):
    entry = MODELS[name]
    entry = dataclasses.replace(entry, options={**entry.options, "sample": 8, "neurons_per_layer": 4,
                                                "max_rf": 2 * max(entry.options["max_rf"], 64)})
    start = time.perf_counter()
    report = check_zoo_model(entry)
    print(f"\n{name}: {len(report.sampled)} layers, {time.perf_counter() - start:.1f} s")
    assert report.status == "pass", [f"{c.name}: {c.summary}" for c in report.checks if c.failed]


@pytest.mark.parametrize("name", ["yolo_toy.ts", "unet_toy.ts"])
def test_check_samples_the_layers_after_an_upsampling(name, tmp_path):
    """The zoo's ``max_rf`` bounds the bottom-up cost; layers decoded per position (after Resize/ConvTranspose)
    are sampled too, so the identity is checked above the upsampling (it was not while ``max_rf`` excluded them)."""
    report = zoo_result(name).report
    _, model = load_randomized(name, tmp_path)
    per_position = {lay.name for lay in fdsub_onnx.inspect_model(model).layers if lay.per_position}
    assert per_position and set(report.sampled) & per_position, report.sampled
    assert next(c for c in report.checks if c.name == "identity").status == "pass"


# ---- (f) local through attention blocks as exporters write them ------------------------------------------------
@pytest.mark.parametrize("name", ["yolo_psa.ts", "mobilevit_xxs.ts", "swin_tiny.ts", "ppocrv4_rec.paddle"])
def test_local_filters_are_input_gradients_through_attention(name, tmp_path):
    """A C2PSA-like block (YOLO with attention), MobileViT's unfold/attention/fold and Swin's windowed attention:
    at a layer after the attention, each instance's local filter gives the activation with its bias (the
    per-instance identity, 1e-4 of the largest activation) and is the input gradient (central differences through
    onnxruntime on the real network, 2% in one random direction)."""
    path, model = load_randomized(name, tmp_path)
    layers = [lay for lay in fdsub_onnx.inspect_model(model).layers if lay.per_position and lay.op in ("Conv",
                                                                                                        "MatMul")]
    target = layers[len(layers) // 2].name
    array = images_of(model, 3, seed=2)
    decoded = fdsub_onnx.decode(model, target, neurons=[0, 1], mode="local", images=fdsub_onnx.ArrayImages(array),
                                top=2, per_instance=True, dtype="float64")
    proto = onnx.load(str(path))
    proto.graph.output.append(helper.make_empty_tensor_value_info(target))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def act(images):
        out = np.concatenate([session.run([target], {model.input_name: images[i:i + 1]})[0]
                              for i in range(len(images))])
        return as_map(model, target, out).astype(np.float64)

    acts, found = act(array), decoded.instances
    scale = np.abs(acts[:, decoded.neurons]).max()
    rng, eps = np.random.default_rng(0), 1e-2
    for k, neuron in enumerate(decoded.neurons):
        for n in range(found.top):
            i, (qy, qx) = found.image_index[k, n], found.position[k, n]
            grad = decoded.instance_filters[k, n]  # the whole image: a token's (or a per-position layer's) field
            pred = (grad * array[i]).sum() + decoded.instance_bias[k, n]
            assert abs(pred - acts[i, neuron, qy, qx]) <= 1e-4 * scale, (target, k, n, pred, acts[i, neuron, qy, qx])
            direction = rng.standard_normal(array.shape[1:]).astype(np.float32)
            plus, minus = (act((array[i] + s * eps * direction)[None])[0, neuron, qy, qx] for s in (1, -1))
            assert (plus - minus) / (2 * eps) == pytest.approx(float((grad * direction).sum()), rel=2e-2,
                                                               abs=1e-3 * scale)
