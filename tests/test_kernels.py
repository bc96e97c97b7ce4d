"""worker/kernels: the fused int8 ops of the ``int8-fused`` recipe, through ONNX Runtime itself.

What users rely on: the op computes the documented arithmetic (per-row u8 codes, int8 GEMM, scales,
bias, erf GELU, the block-32 rotation) on shapes a worker meets, every kernel path this CPU offers
gives the same bits (a fleet of mixed CPUs stores the same vectors), a worker without the library or
with a path its CPU lacks says so clearly, and bad shapes get an error instead of a crash.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from deposium.convert.fuse import pack_weights
from deposium.convert.rotate import hadamard
from deposium.convert.validate import load_paragraphs
from deposium.worker.artifact import load_manifest
from deposium.worker.config import ConfigError, Settings, load_settings
from deposium.worker.embedder import Embedder, session_options
from deposium.worker.kernels import DOMAIN, ISAS, KernelLibraryError, active_isa, library_path

X86 = platform.machine().lower() in {"x86_64", "amd64"}
pytestmark = pytest.mark.skipif(not X86, reason="the fused kernels are x86-64 code (setup.py builds them there only)")



def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


#: Which paths this CPU can run, read from /proc/cpuinfo independently of the library's own check.
FEATURES = _cpu_flags()
AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
AVAILABLE = [isa for isa, flags in (("amx", AVX512 | {"amx_int8"}), ("vnni", AVX512), ("avx2", {"avx2", "fma"}))
             if flags <= FEATURES]
KINDS = [(rotate, act) for rotate in (False, True) for act in ("", "Bias", "BiasGelu")]


def test_the_library_is_built_by_the_install():
    """scripts/setup.sh installs with DEPOSIUM_REQUIRE_KERNELS=1: the library must be there on x86-64."""
    path = library_path()
    assert path is not None and path.is_file(), "setup.py did not build worker/kernels"
    assert AVAILABLE, f"this CPU offers none of the kernel paths: {sorted(FEATURES)}"


def _op_model(rotate: bool, act: str, k: int, n: int, rng: np.random.Generator,
              width: int | str | None = None) -> tuple[onnx.ModelProto, dict]:
    """One fused op over random weights, as convert/fuse.py writes it; and what the reference needs."""
    w = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
    w_scale = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    inits = [numpy_helper.from_array(pack_weights(w), "b"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(w.astype(np.int32).sum(axis=0).astype(np.int32), "colsum")]
    inputs = ["x", "b", "w_scale", "colsum"]
    if act:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs.append("bias")
    op_type = ("FusedRotRowQGemm" if rotate else "FusedRowQGemm") + act
    graph = helper.make_graph(
        [helper.make_node(op_type, inputs, ["y"], domain=DOMAIN)], "fused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width or k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    return model, {"w": w, "w_scale": w_scale, "bias": bias}


def _reference(x: np.ndarray, rotate: bool, act: str, w: np.ndarray, w_scale: np.ndarray,
               bias: np.ndarray) -> np.ndarray:
    """The documented arithmetic in numpy (float64 where the kernel's rounding does not matter)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if rotate:
        rows = rows @ np.kron(np.eye(rows.shape[1] // 32), hadamard(32))
    rows = rows.astype(np.float32)
    amax = np.maximum(np.abs(rows).max(axis=1), np.float32(1e-10 * 127))
    codes = np.rint(rows * (np.float32(127) / amax)[:, None]).clip(-128, 127)  # u8 code - 128
    y = (codes.astype(np.int64) @ w.astype(np.int64)) * (w_scale[None, :].astype(np.float64) * amax[:, None])
    if act:
        y = y + bias
    if act == "BiasGelu":
        y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    return y.reshape(*x.shape[:-1], -1)


def _session(model: onnx.ModelProto, isa: str) -> ort.InferenceSession:
    options = session_options(dataclasses.replace(Settings(), kernel_isa=isa), kernel_library=library_path())
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _activations(rng: np.random.Generator, k: int) -> np.ndarray:
    """2 x 11 rows (not a multiple of AMX's 16 or VNNI's 6): ordinary rows, 40x outlier channels, a zero row."""
    x = rng.normal(size=(2, 11, k)).astype(np.float32)
    x[0, 3, 5] *= 40
    x[1, 2, :7] *= 40
    x[1, 7] = 0
    return x


@pytest.mark.parametrize(("rotate", "act"), KINDS)
@pytest.mark.parametrize("isa", AVAILABLE)
def test_the_op_computes_the_documented_arithmetic(isa, rotate, act):
    rng = np.random.default_rng(7)
    k, n = 128, 192
    model, parts = _op_model(rotate, act, k, n, rng)
    x = _activations(rng, k)
    session = _session(model, isa)
    got = session.run(None, {"x": x})[0]
    assert active_isa() == isa  # the forced path is the one that ran (asked while the session holds the library)
    ref = _reference(x, rotate, act, **parts)
    assert got.shape == (2, 11, n) and got.dtype == np.float32
    # Exact codes give float rounding only; the rotation's butterflies may round a code the other way
    # than numpy's matrix product now and then, which moves an output by one code step of that row.
    step = np.abs(x).max() / 127 * np.abs(parts["w"]).max() * parts["w_scale"].max()
    tolerance = 2 * step if rotate else 1e-5 * np.abs(ref).max()
    assert np.abs(got - ref).max() <= tolerance, np.abs(got - ref).max()
    if not act:
        assert not got[1, 7].any()  # a zero row: the amax floor, zero codes, zero output (no NaN)
    # batch invariance: every row alone gives the same bits as inside the batch
    alone = np.stack([session.run(None, {"x": x[b:b + 1, s:s + 1]})[0][0, 0]
                      for b in range(2) for s in range(11)])
    assert np.array_equal(alone, got.reshape(22, n))


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="this CPU offers one kernel path only")
def test_every_kernel_path_gives_the_same_bits():
    rng = np.random.default_rng(11)
    x = _activations(rng, 256)
    for rotate, act in KINDS:
        model, _ = _op_model(rotate, act, 256, 128, rng)
        outputs = {isa: _session(model, isa).run(None, {"x": x})[0] for isa in AVAILABLE}
        first = outputs[AVAILABLE[0]]
        for isa, out in outputs.items():
            assert np.array_equal(out, first), (rotate, act, isa, np.abs(out - first).max())


def _split_model(op_model: onnx.ModelProto, widths: list[int], rotate: bool) -> onnx.ModelProto:
    """The same op as a ``...Split`` op: one output per part of the merged GEMM (q / k / v, gate / up)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(op_model.graph)
    node = graph.node[0]
    node.op_type = ("FusedRotRowQGemm" if rotate else "FusedRowQGemm") + "Split"
    node.input.append("widths")
    graph.initializer.append(numpy_helper.from_array(np.asarray(widths, np.int64), "widths"))
    del node.output[:]
    del graph.output[:]
    for i, width in enumerate(widths):
        node.output.append(f"y{i}")
        graph.output.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["batch", "seq", width]))
    return helper.make_model(graph, opset_imports=list(op_model.opset_import))


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("isa", AVAILABLE)
def test_split_ops_write_each_part_of_the_same_bits(isa, rotate):
    """A merged GEMM's parts as separate outputs are, bit for bit, the columns of the one-output op."""
    rng = np.random.default_rng(5)
    model, _ = _op_model(rotate, "", 128, 320, rng)
    x = _activations(rng, 128)
    whole = _session(model, isa).run(None, {"x": x})[0]
    widths = [128, 64, 128]
    parts = _session(_split_model(model, widths, rotate), isa).run(None, {"x": x})
    assert [p.shape for p in parts] == [(2, 11, w) for w in widths]
    assert np.array_equal(np.concatenate(parts, axis=-1), whole)
    with pytest.raises(Exception, match="not a multiple of 64"):
        _session(_split_model(model, [96, 96, 128], rotate), isa).run(None, {"x": x})
    with pytest.raises(Exception, match="summing to 256, for N = 320"):
        _session(_split_model(model, [128, 128], rotate), isa).run(None, {"x": x})


@pytest.mark.skipif(len(AVAILABLE) < 2, reason="this CPU offers one kernel path only")
def test_an_int8_fused_artifact_embeds_the_same_bits_on_every_path(minilm_artifact):
    """The suite's MiniLM artifact (int8-fused: rotations, biases and GELUs folded) end to end."""
    assert load_manifest(minilm_artifact).quantization["recipe"] == "int8-fused"
    texts = load_paragraphs(limit=24) + ["short", "a query about vectors"]
    vectors = {}
    for isa in AVAILABLE:
        embedder = Embedder(minilm_artifact, settings=dataclasses.replace(load_settings({}), kernel_isa=isa))
        assert embedder.kernel_isa == isa
        vectors[isa] = embedder.embed(texts).vectors
    for isa in AVAILABLE[1:]:
        assert np.array_equal(vectors[isa], vectors[AVAILABLE[0]]), isa


def test_a_kernel_path_the_cpu_lacks_or_an_unknown_one_is_refused(minilm_artifact):
    with pytest.raises(ConfigError, match="DEPOSIUM_KERNEL_ISA"):
        load_settings({"DEPOSIUM_KERNEL_ISA": "sse2"})
    # Past the settings check (a Settings built in code), the library refuses it itself.
    with pytest.raises(KernelLibraryError, match="choose one of auto, amx, vnni, avx2"):
        Embedder(minilm_artifact, settings=dataclasses.replace(Settings(), kernel_isa="sse2"))
    lacking = [isa for isa in ISAS if isa not in AVAILABLE]
    for isa in lacking:
        with pytest.raises(KernelLibraryError, match=f"DEPOSIUM_KERNEL_ISA={isa}: this CPU"):
            Embedder(minilm_artifact, settings=dataclasses.replace(Settings(), kernel_isa=isa))


def test_an_artifact_needing_a_missing_library_says_how_to_get_it(minilm_artifact, monkeypatch):
    monkeypatch.setattr("deposium.worker.kernels.library_path", lambda: None)  # an install without a C compiler
    with pytest.raises(KernelLibraryError, match="deposium_rowq kernel library.*--recipe int8-rot"):
        Embedder(minilm_artifact)


def test_shapes_the_kernels_cannot_take_get_an_error_not_a_crash():
    rng = np.random.default_rng(3)
    model, _ = _op_model(False, "", 64, 64, rng, width="width")
    session = _session(model, AVAILABLE[0])
    with pytest.raises(Exception, match="K = 48 and N = 64 must be positive multiples of 64"):
        session.run(None, {"x": rng.normal(size=(1, 2, 48)).astype(np.float32)})
    # no rows at all is fine: an empty output, no kernel call
    assert session.run(None, {"x": np.zeros((0, 2, 64), np.float32)})[0].shape == (0, 2, 64)
