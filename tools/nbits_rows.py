"""What a batched int4 decode step can give at most: the cost of onnxruntime's ``MatMulNBits``
with 2 and 4 rows against 1 row, on edge-small's decoder shapes (issue 33).

    python -m tools.nbits_rows --layers 4 --threads 2

builds a graph of ``--layers`` × (qkv 896→1152, o 896→896, gate+up 896→9728, down 4864→896)
``MatMulNBits`` nodes with random packed weights, for each block size and accuracy level
(4: int8 compute, the fast path our int4 recipe uses; 0: fp32 compute), times one run with 1, 2 and
4 rows (median of ``--repeats`` after 3 warm-ups) and prints one JSON line per setting. ``4 / (4-row
time / 1-row time)`` is the most a 4-stream continuous batch can reach over one stream on these
weights, whatever the scheduler does (docs/benchmarks.md, "Caches and continuous batching").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

HIDDEN, INTERMEDIATE = 896, 4864
SHAPES = ((HIDDEN, 1152), (HIDDEN, HIDDEN), (HIDDEN, 2 * INTERMEDIATE), (INTERMEDIATE, HIDDEN))


def nbits_graph(layers: int, block: int, accuracy_level: int, bits: int = 4) -> bytes:
    """A serialized ONNX model: inputs ``A`` [M, 896] and ``H`` [M, 4864], one output per node."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for layer in range(layers):
        for j, (k, n) in enumerate(SHAPES):
            blocks = (k + block - 1) // block
            name = f"l{layer}_{j}"
            w = rng.integers(0, 255, size=(n, blocks, block * bits // 8), dtype=np.uint8)
            scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
            inits += [helper.make_tensor(f"{name}_B", TensorProto.UINT8, w.shape, w.tobytes(), raw=True),
                      helper.make_tensor(f"{name}_s", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)]
            nodes.append(helper.make_node(
                "MatMulNBits", ["A" if k == HIDDEN else "H", f"{name}_B", f"{name}_s"], [f"{name}_y"],
                domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level))
            outs.append(helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["M", n]))
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", HIDDEN]),
              helper.make_tensor_value_info("H", TensorProto.FLOAT, ["M", INTERMEDIATE])]
    model = helper.make_model(helper.make_graph(nodes, "nbits_rows", inputs, outs, inits), ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def time_rows(session: object, rows: int, repeats: int) -> float:
    """Median milliseconds of one run with ``rows`` rows (after 3 warm-up runs)."""
    feeds = {"A": np.random.default_rng(1).standard_normal((rows, HIDDEN), dtype=np.float32),
             "H": np.random.default_rng(2).standard_normal((rows, INTERMEDIATE), dtype=np.float32)}
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(layers: int, blocks: list[int], levels: list[int], threads: int, repeats: int) -> list[dict]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = []
    for block in blocks:
        for level in levels:
            sess = ort.InferenceSession(nbits_graph(layers, block, level), opts, providers=["CPUExecutionProvider"])
            ms = {rows: time_rows(sess, rows, repeats) for rows in (1, 2, 4)}
            out.append({"onnxruntime": ort.__version__, "layers": layers, "block_size": block,
                        "accuracy_level": level, "threads": threads, "ms": ms,
                        "cost_2_rows": ms[2] / ms[1], "cost_4_rows": ms[4] / ms[1],
                        "max_4_stream_aggregate": 4 * ms[1] / ms[4]})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="example: python -m tools.nbits_rows --layers 4 --threads 2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers' worth of matmuls (default 4)")
    p.add_argument("--block-sizes", default="32,64,128", help="comma-separated (default 32,64,128)")
    p.add_argument("--accuracy-levels", default="4,0", help="comma-separated (default 4,0)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per row count (default 15)")
    a = p.parse_args(argv)
    if a.layers < 1 or a.threads < 1 or a.repeats < 1:
        p.error("--layers, --threads and --repeats must be >= 1")
    try:
        blocks = [int(x) for x in a.block_sizes.split(",")]
        levels = [int(x) for x in a.accuracy_levels.split(",")]
    except ValueError:
        p.error("--block-sizes and --accuracy-levels take comma-separated integers")
    if any(b < 16 or b & (b - 1) for b in blocks) or any(x not in (0, 1, 2, 3, 4) for x in levels):
        p.error("block sizes must be powers of two >= 16 and accuracy levels 0..4")
    for row in measure(a.layers, blocks, levels, a.threads, a.repeats):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
