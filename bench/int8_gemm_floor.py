"""The int8 GEMM floor of this CPU: ONNX Runtime's ``MatMulIntegerToFloat`` alone, by rows.

Usage: python -m deposium.bench.int8_gemm_floor [--k 768] [--n 1152] [--layers 72] [--rows 1,4,8,16,32,64,128]
       [--weights s8|u8|fp32]

Why: a short query's latency cannot drop below the time of its GEMMs, whatever the rest of the graph
does. This builds a graph holding nothing but ``layers`` GEMMs of [rows, k] u8 x [k, n] int8 (random
prepacked weights, the shipped recipes' kernel, the worker's session options) summed into one output, and prints the
median CPU time per run of 7 and the GOP/s it reaches. EmbeddingGemma-300m's transformer runs 168
GEMMs with ~101 M weights, i.e. about 1.6 x the default 72 GEMMs of 768 x 1,152 (64 M weights).
It also times one plain read of as many bytes as the weights (a NumPy max over them, the fastest
read measured: ~27 GB/s for 64 MB on a Xeon core where a sum reached 18): where a
GEMM takes about that long, it is bound by memory bandwidth, not arithmetic, and no kernel that
reads the same weights can run faster. ``--weights u8`` times the u8 x u8 kernel a worker runs on
x86 without VNNI (``worker/variant.py``), ``--weights fp32`` a plain fp32 ``MatMul`` of the same
shapes: the floor an fp32 artifact stands on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from deposium.worker.config import load_settings
from deposium.worker.embedder import session_options


def gemm_graph(k: int, n: int, layers: int, weights: str = "s8", seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp")]
    nodes, outputs = [], []
    for i in range(layers):
        signed = rng.integers(-127, 128, (k, n), dtype=np.int8)
        if weights == "fp32":
            inits.append(numpy_helper.from_array(signed.astype(np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["xf", f"w{i}"], [f"y{i}"]))
        else:
            inputs = ["x", f"w{i}", "one", f"s{i}", "zp"]
            if weights == "u8":  # the same integers shifted by 128, as ONNX Runtime does for u8 x u8
                inits.append(numpy_helper.from_array((signed.astype(np.int16) + 128).astype(np.uint8), f"w{i}"))
                inputs.append("zp")
            else:
                inits.append(numpy_helper.from_array(signed, f"w{i}"))
            inits.append(numpy_helper.from_array(np.ones(n, np.float32), f"s{i}"))
            nodes.append(helper.make_node("MatMulIntegerToFloat", inputs, [f"y{i}"], domain="com.microsoft"))
        outputs.append(f"y{i}")
    if weights == "fp32":
        nodes.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Sum", outputs, ["y"]))
    graph = helper.make_graph(nodes, "gemm_floor", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def read_seconds(nbytes: int, repeats: int = 7) -> float:
    """Median CPU time of one sequential read of ``nbytes``, read as often as the GEMMs read their
    weights (so both get whatever share of the shared L3 cache the host leaves them)."""
    buf = np.ones(max(nbytes, 1), np.uint8)
    buf.max()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        buf.max()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--n", type=int, default=1152)
    parser.add_argument("--layers", type=int, default=72)
    parser.add_argument("--rows", default="1,4,8,16,32,64,128")
    parser.add_argument("--weights", choices=("s8", "u8", "fp32"), default="s8",
                        help="s8: the u8 x s8 kernel; u8: the u8 x u8 kernel; fp32: MatMul")
    args = parser.parse_args()

    opts = session_options(load_settings())  # the worker's own: one thread, every graph optimisation
    with tempfile.TemporaryDirectory() as tmp:  # the session reads the file once, at creation
        path = Path(tmp) / "gemm.onnx"
        onnx.save(gemm_graph(args.k, args.n, args.layers, args.weights), path)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    weights_mb = args.layers * args.k * args.n / 1e6 * (4 if args.weights == "fp32" else 1)
    read = read_seconds(int(weights_mb * 1e6))
    print(f"one read of {weights_mb:.0f} MB: {1000 * read:7.2f} ms ({weights_mb / 1000 / read:.1f} GB/s on one core)")
    for rows in (int(r) for r in args.rows.split(",")):
        x = rng.integers(0, 256, (rows, args.k), dtype=np.uint8)
        session.run(None, {"x": x})
        times = []
        for _ in range(7):
            start = time.process_time()
            session.run(None, {"x": x})
            times.append(time.process_time() - start)
        seconds = statistics.median(times)
        gops = 2 * rows * args.k * args.n * args.layers / seconds / 1e9
        print(f"rows {rows:4d}: {1000 * seconds:7.2f} ms for {args.layers} GEMMs {args.k}x{args.n} "
              f"({weights_mb:.0f} MB of {args.weights} weights), {gops:6.1f} GOP/s")


if __name__ == "__main__":
    main()
