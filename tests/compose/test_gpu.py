"""The GPU backend: device resolution and plumbing (always run), CPU-vs-GPU parity (on a CUDA GPU only).

The parity tests are skipped, with the reason, where CuPy sees no GPU; set FDSUB_REQUIRE_GPU=1 (a GPU CI
job) to make that a failure instead of a skip.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
from checks import load_proto
from netgen import NetBuilder, linear_zoo, relu_zoo
from typer.testing import CliRunner

import fdsub_onnx as fd
from fdsub_onnx import FdsubError
from fdsub_onnx.cli.main import app
from fdsub_onnx.compose import backend as _backend
from fdsub_onnx.compose.backend import CPU, CupyBackend, Device, NumpyBackend, gpu_unavailable, resolve_device
from fdsub_onnx.evaluate.compare import compare_modes
from fdsub_onnx.runtime import session as _session_module

NO_GPU = gpu_unavailable()
if NO_GPU and os.environ.get("FDSUB_REQUIRE_GPU") == "1":
    raise RuntimeError(f"FDSUB_REQUIRE_GPU=1 but {NO_GPU}")
needs_gpu = pytest.mark.skipif(bool(NO_GPU), reason=f"no GPU: {NO_GPU}")


# ---- device resolution (CPU machine or not) -------------------------------------------------------------
def test_cpu_is_numpy_on_the_cpu_provider():
    assert resolve_device("cpu") == CPU and CPU.backend == "numpy" and CPU.providers == ("CPUExecutionProvider",)


def test_unknown_device_is_one_clear_error():
    with pytest.raises(FdsubError, match="unknown device 'tpu'; choose one of cpu, gpu, auto"):
        resolve_device("tpu")


def test_gpu_without_gpu_fails_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(_backend, "gpu_unavailable", lambda: "CUDA sees no GPU")
    with pytest.raises(FdsubError, match="--device gpu: CUDA sees no GPU; use --device cpu"):
        resolve_device("gpu")
    auto = resolve_device("auto")
    assert (auto.name, auto.backend, auto.providers) == ("cpu", "numpy", CPU.providers)
    assert auto.notice == "no GPU (CUDA sees no GPU); running on the CPU"


@pytest.mark.parametrize("providers, expected, notice", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ("CUDAExecutionProvider", "CPUExecutionProvider"), ""),
    (["CPUExecutionProvider"], ("CPUExecutionProvider",), "onnxruntime-gpu"),
])
def test_gpu_capture_uses_cuda_provider_when_onnxruntime_has_it(monkeypatch, providers, expected, notice):
    monkeypatch.setattr(_backend, "gpu_unavailable", lambda: "")
    monkeypatch.setattr(_backend, "_ort_providers", lambda: providers)
    for name in ("gpu", "auto"):
        device = resolve_device(name)
        assert (device.name, device.backend, device.providers) == ("gpu", "cupy", expected)
        assert notice in device.notice and bool(device.notice) == bool(notice)


def test_cupy_backend_overrides_every_numpy_method():
    """Method for method: a NumpyBackend method the CuPy backend does not define would run NumPy on GPU arrays."""
    public = {name for name, value in vars(NumpyBackend).items() if callable(value) and not name.startswith("_")}
    assert public >= {"asarray", "to_numpy", "zeros", "empty", "matmul", "shift_add", "free_bytes"}
    assert public - set(vars(CupyBackend)) == set()


def test_cupy_missing_is_a_one_line_reason(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    assert gpu_unavailable() == "CuPy is not installed (pip install 'fdsub-onnx[gpu]')"
    with pytest.raises(FdsubError, match="CuPy is not installed"):
        CupyBackend()


def test_numpy_shift_add_is_the_shifted_sum():
    rng = np.random.default_rng(0)
    products = rng.standard_normal((4, 3, 2, 5, 6))
    offsets = [(0, 0), (0, 2), (3, 0), (3, 2)]
    out = rng.standard_normal((3, 2, 8, 8))
    want = out.copy()
    for t, (y, x) in enumerate(offsets):
        for a in range(5):
            for b in range(6):
                want[:, :, y + a, x + b] += products[t, :, :, a, b]
    NumpyBackend().shift_add(out, products, offsets)
    np.testing.assert_array_equal(out, want)


def _numpy_as_cupy():
    """A stand-in ``cupy`` module made of NumPy: runs the CuPy backend's own code (not its CUDA kernel) on a CPU."""
    import types

    fake = types.ModuleType("cupy")
    for name in ("ascontiguousarray", "asarray", "zeros", "empty", "matmul", "ndarray", "concatenate", "einsum", "add",
                 "multiply"):
        setattr(fake, name, getattr(np, name))
    fake.asnumpy = np.asarray
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                                                    memGetInfo=lambda: (8 << 30, 16 << 30)))
    fake.get_default_memory_pool = lambda: types.SimpleNamespace(free_bytes=lambda: 0)
    return fake


@pytest.mark.parametrize("mode", ["weights", "fds", "local"])
def test_gpu_code_path_with_numpy_standing_in_for_cupy(mode, tmp_path, monkeypatch):
    """The whole --device gpu path (resolution, engine through CupyBackend unfused, the result back as NumPy)."""
    monkeypatch.setitem(__import__("sys").modules, "cupy", _numpy_as_cupy())
    monkeypatch.setitem(_backend.BACKENDS, "cupy", lambda: CupyBackend(fused=False))
    monkeypatch.setattr(_backend, "_ort_providers", lambda: ["CPUExecutionProvider"])
    device = resolve_device("gpu")
    assert (device.name, device.backend) == ("gpu", "cupy") and "onnxruntime-gpu" in device.notice
    model, layer = _small_relu_net(tmp_path)
    images = fd.ArrayImages(np.random.default_rng(5).standard_normal((8, 3, 12, 12)).astype(np.float32))
    cpu, gpu = (fd.decode(model, layer, mode=mode, images=None if mode == "weights" else images, top=3, device=d)
                for d in ("cpu", device))
    np.testing.assert_array_equal(gpu.filters, cpu.filters)
    np.testing.assert_array_equal(gpu.bias, cpu.bias)


# ---- the device reaches onnxruntime on every data path -----------------------------------------------------
MARKED = Device("gpu", "numpy", ("MarkedProvider",))


def _small_relu_net(tmp_path):
    b = NetBuilder(height=12, width=12, seed=3)
    x = b.maxpool(b.relu(b.conv("input", 4, 3, 1, (1, 1, 1, 1))), 2, 2)
    return load_proto(b.build([b.conv(x, 3, 3)]), tmp_path), b.last


DATA_PATHS = {
    "capture_top": lambda m, layer, im: fd.capture_top(m, layer, im, top=2, device=MARKED),
    "fds": lambda m, layer, im: fd.decode(m, layer, mode="fds", images=im, top=2, device=MARKED),
    "local": lambda m, layer, im: fd.decode(m, layer, mode="local", images=im, top=2, device=MARKED),
    "deconvnet": lambda m, layer, im: fd.decode(m, layer, mode="deconvnet", images=im, top=2, device=MARKED),
    "fidelity": lambda m, layer, im: compare_modes(m, layer, im, im, top=2, device=MARKED),
    "report": lambda m, layer, im: fd.report(m, im, m.path + "-report", top=2, device=MARKED),
}


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_every_data_path_runs_onnxruntime_on_the_devices_providers(path, tmp_path, monkeypatch):
    asked = []
    real_session = _session_module.session

    def recording(proto, providers=CPU.providers, threads=None, arena=False):
        asked.append(tuple(providers))
        return real_session(proto)

    monkeypatch.setattr(_session_module, "session", recording)
    model, layer = _small_relu_net(tmp_path)
    images = fd.ArrayImages(np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32))
    DATA_PATHS[path](model, layer, images)
    assert asked and set(asked) == {MARKED.providers}


def test_device_option_on_every_data_command():
    from fdsub_onnx.cli import decode_cmd, fidelity_cmd, nf_cmd, report_cmd, top_cmd

    for command in (decode_cmd.decode, top_cmd.top, nf_cmd.nf, fidelity_cmd.fidelity, report_cmd.report):
        option = inspect.signature(command).parameters["device"].default
        assert option.default is None and "[default: auto]" in option.help  # auto, without the note of --device auto


def test_cli_device_gpu_without_gpu_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(_backend, "gpu_unavailable", lambda: "CUDA sees no GPU")
    model, layer = _small_relu_net(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["decode", model.path, "--layer", layer, "--device", "gpu", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert result.output.strip() == "error: --device gpu: CUDA sees no GPU; use --device cpu (or auto)"
    result = CliRunner().invoke(app, ["decode", model.path, "--layer", layer, "--device", "auto", "--out", str(out)])
    assert result.exit_code == 0 and (out / "decoded.npz").exists()
    assert result.output.strip().splitlines()[-1] == "note: no GPU (CUDA sees no GPU); running on the CPU"


# ---- parity on a GPU ----------------------------------------------------------------------------------
def _nets():
    return [(name, proto) for name, proto in linear_zoo() + relu_zoo()]


@needs_gpu
@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-4), ("float64", 1e-10)])
@pytest.mark.parametrize("fused", [True, False])
def test_weights_parity_on_generated_nets(dtype, rtol, fused, tmp_path, monkeypatch):
    monkeypatch.setitem(_backend.BACKENDS, "cupy", lambda: CupyBackend(fused=fused))
    for name, proto in _nets():
        model = load_proto(proto, tmp_path / name)
        for layer in [v.name for v in proto.graph.output]:
            cpu = fd.decode(model, layer, dtype=dtype, device="cpu")
            gpu = fd.decode(model, layer, dtype=dtype, device="gpu")
            _close(gpu, cpu, rtol, f"{name}/{layer}")


@needs_gpu
@pytest.mark.parametrize("mode", ["fds", "local", "deconvnet"])
def test_data_mode_parity(mode, tmp_path):
    for name, proto in relu_zoo()[:4]:
        model = load_proto(proto, tmp_path / name)
        images = fd.ArrayImages(
            np.random.default_rng(1).standard_normal((10, *model.input_shape[1:])).astype(np.float32))
        layer = proto.graph.output[-1].name
        for dtype, rtol in (("float32", 1e-4), ("float64", 1e-10)):
            cpu = fd.decode(model, layer, mode=mode, images=images, top=3, dtype=dtype, device="cpu")
            gpu = fd.decode(model, layer, mode=mode, images=images, top=3, dtype=dtype, device="gpu")
            if mode != "fds" or dtype == "float32":  # float64 fds: the statistics come from float32 onnxruntime runs
                _close(gpu, cpu, rtol if mode == "fds" else 1e-4, f"{name}/{layer}/{dtype}")


@needs_gpu
def test_cuda_capture_matches_cpu_capture(tmp_path):
    model, layer = _small_relu_net(tmp_path)
    images = fd.ArrayImages(np.random.default_rng(2).standard_normal((40, 3, 12, 12)).astype(np.float32))
    cpu, gpu = (fd.capture_top(model, layer, images, top=5, device=d) for d in ("cpu", "gpu"))
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-4, atol=1e-5)
    assert (gpu.image_index == cpu.image_index).mean() > 0.95  # near-ties may swap under another provider's rounding


@needs_gpu
def test_fused_shift_add_equals_numpy():
    import cupy as cp

    rng = np.random.default_rng(4)
    products = rng.standard_normal((9, 5, 3, 7, 6))
    offsets = [(2 * i, 2 * j) for i in range(3) for j in range(3)]
    out = rng.standard_normal((5, 3, 11, 10))
    want = out.copy()
    NumpyBackend().shift_add(want, products, offsets)
    got = cp.asarray(out)
    CupyBackend(fused=True).shift_add(got, cp.asarray(products), offsets)
    np.testing.assert_allclose(cp.asnumpy(got), want, rtol=1e-12)


def _close(gpu, cpu, rtol, what):
    assert isinstance(gpu.filters, np.ndarray), "results come back as NumPy"
    scale = max(float(np.abs(cpu.filters).max()), 1e-30)
    err = float(np.abs(gpu.filters - cpu.filters).max()) / scale
    assert err <= rtol, f"{what}: filters differ by {err:.2e} of max |filter| (allowed {rtol:.0e})"
    bias_scale = max(float(np.abs(cpu.bias).max()), 1e-30)
    assert float(np.abs(gpu.bias - cpu.bias).max()) / bias_scale <= rtol, f"{what}: bias"
