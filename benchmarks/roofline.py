"""The physical limits of this machine, measured, and where a decoder run sits against them.

    limits = measure_limits(threads=2)            # copy / GEMV bandwidth (GB/s), matmul GFLOP/s
    cost = DecoderCost.from_llm(cfg.llm, vocab_size=cfg.vocab_size)
    cost.decode_bytes_per_token("fp32", context=288)   # weights + KV cache read per new token
    roof = decode_roofline(cost, "fp32", context=288, bandwidth_gbs=limits.bandwidth_gbs)
    frac = measured_tok_s / roof                   # fraction of the bandwidth roofline

Decode is memory-bound: every new token reads every matmul weight once plus the whole KV cache,
so ``tokens/s <= bandwidth / bytes_per_token``. Prefill is compute-bound: it needs
``2 * params * T`` FLOPs for the projections plus the causal attention products, so its
achieved FLOP/s is compared with a measured large-matmul FLOP/s on the same threads.

Bandwidth is measured two ways and the larger is the ceiling used: a multi-threaded copy of a
large array (numpy, read + write bytes counted) and a large matrix-vector product with ONNX
Runtime's MatMul (the access pattern and kernel of decode itself: a constant weight far larger
than the caches, read once per call). Both
are lower bounds on what the memory system can do; an engine beating them is possible (better
prefetching), which shows as a fraction above 1.

This module imports numpy only at import time; the probes use onnxruntime (GEMV) and torch
(matmul) when installed, numpy otherwise.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Bytes per weight parameter as stored by each precision (block formats include their scales).
BYTES_PER_PARAM = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "int8": 1.0 + 4.0 / 32,  # MatMulNBits 8-bit, block 32, fp32 scale
    "int8-dynamic": 1.0,  # int8 per output channel (one fp32 scale per column: under 0.5 % at width >= 896)
    "q8_0": 34.0 / 32,  # llama.cpp: 32 int8 + one fp16 scale per block
    "int4": 0.5 + 4.0 / 32 + 0.5 / 32,  # MatMulNBits 4-bit, block 32, fp32 scale + 4-bit zero point
    "q4_0": 18.0 / 32,  # llama.cpp: 32 nibbles + one fp16 scale per block
}


# ---- the machine's limits ----------------------------------------------------------------


@dataclass
class MachineLimits:
    copy_gbs: float  # multi-threaded array copy, (read + write) bytes / s
    gemv_gbs: float  # large fp32 matrix-vector product, weight bytes read / s
    matmul_gflops: float  # large fp32 matmul
    threads: int
    copy_mb: int
    method: str

    @property
    def bandwidth_gbs(self) -> float:
        """The ceiling used for the decode roofline: the best measured bandwidth."""
        return max(self.copy_gbs, self.gemv_gbs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_gbs"] = self.bandwidth_gbs
        return d


def copy_bandwidth(mb: int = 256, threads: int = 1, repeats: int = 5) -> float:
    """Best (read + write) GB/s of `threads` threads each copying its share of an `mb` MB array.

    numpy releases the GIL while copying, so the threads run in parallel.
    """
    threads = max(1, threads)
    n = max(1, mb * (1 << 20) // 4 // threads)
    src = [np.ones(n, np.float32) for _ in range(threads)]
    dst = [np.empty_like(s) for s in src]
    for s, d in zip(src, dst, strict=True):  # touch every page before timing
        np.copyto(d, s)
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def work(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            np.copyto(dst[i], src[i])

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in pool:
            t.join()
        dt = time.perf_counter() - t0
        best = max(best, 2 * n * 4 * threads / dt / 1e9)
    return best


def _torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(max(1, threads))
    return torch


def _ort_gemv(rows: int, cols: int, threads: int):
    """A [1, cols] x [cols, rows] MatMul session with a constant weight (prepacked like a decoder's)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((cols, rows), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model, w
    x = np.ones((1, cols), np.float32)
    return lambda: sess.run(None, {"x": x})


def gemv_bandwidth(mb: int = 256, threads: int = 1, repeats: int = 5) -> tuple[float, str]:
    """Best weight-read GB/s of an fp32 matrix-vector product over an `mb` MB matrix: the access
    pattern of a decode step. Uses ONNX Runtime's MatMul (the kernel our decoder runs) when
    installed, else torch.mv, else numpy. Returns (GB/s, which engine)."""
    cols = 4096
    rows = max(1, mb * (1 << 20) // 4 // cols)
    try:
        run = _ort_gemv(rows, cols, threads)
        how = "onnxruntime MatMul"
    except ImportError:
        torch = _torch(threads)
        if torch is not None:
            w, x = torch.randn(rows, cols), torch.randn(cols)

            def run() -> None:
                torch.mv(w, x)
            how = "torch.mv"
        else:
            w_np = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
            x_np = np.ones(cols, np.float32)

            def run() -> None:
                w_np @ x_np
            how = "numpy"
    run()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = max(best, rows * cols * 4 / (time.perf_counter() - t0) / 1e9)
    return best, how


def matmul_gflops(size: int = 2048, threads: int = 1, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a `size`^3 matmul."""
    torch = _torch(threads)
    if torch is not None:
        a, b = torch.randn(size, size), torch.randn(size, size)

        def run() -> None:
            torch.mm(a, b)
    else:
        rng = np.random.default_rng(0)
        a_np = rng.standard_normal((size, size), dtype=np.float32)
        b_np = rng.standard_normal((size, size), dtype=np.float32)

        def run() -> None:
            a_np @ b_np
    run()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def measure_limits(threads: int = 1, copy_mb: int = 256, matmul_size: int = 2048, repeats: int = 5
                   ) -> MachineLimits:
    """Copy bandwidth (best of 1 and `threads` threads), GEMV bandwidth and matmul FLOP/s."""
    copy = max(copy_bandwidth(copy_mb, 1, repeats), copy_bandwidth(copy_mb, threads, repeats))
    gemv, gemv_how = gemv_bandwidth(copy_mb, threads, repeats)
    flops = matmul_gflops(matmul_size, threads, repeats)
    mm = "torch.mm" if _torch(threads) is not None else "numpy matmul"
    return MachineLimits(copy_gbs=copy, gemv_gbs=gemv, matmul_gflops=flops, threads=threads, copy_mb=copy_mb,
                         method=f"numpy copy ({copy_mb} MB, read + write counted), {gemv_how} GEMV ({copy_mb} MB "
                         f"weight), {mm} ({matmul_size}^3)")


# ---- the decoder's cost model --------------------------------------------------------------


@dataclass
class DecoderCost:
    """Parameter counts of a Llama/Qwen2-style decoder, for bytes-per-token and FLOP counts."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    attention_bias: bool = False

    @classmethod
    def from_llm(cls, llm: Any, vocab_size: int) -> DecoderCost:
        return cls(num_layers=llm.num_layers, hidden_size=llm.hidden_size, num_heads=llm.num_heads,
                   num_kv_heads=llm.num_kv_heads, head_dim=llm.head_dim, intermediate_size=llm.intermediate_size,
                   vocab_size=vocab_size, attention_bias=llm.attention_bias)

    @property
    def layer_matmul_params(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2  # q, o + k, v
        return attn + 3 * d * self.intermediate_size

    @property
    def layer_small_params(self) -> int:
        """Norm weights and q/k/v biases (kept in fp32 by every quantizer)."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return 2 * self.hidden_size + bias

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies: all layers plus the LM head."""
        return self.num_layers * self.layer_matmul_params + self.hidden_size * self.vocab_size

    @property
    def total_params(self) -> int:
        """Including the embedding table (untied)."""
        return (self.matmul_params + self.num_layers * self.layer_small_params + self.hidden_size
                + self.hidden_size * self.vocab_size)

    def kv_bytes_per_position(self, kv_bytes: int = 4) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * kv_bytes

    def decode_bytes_per_token(self, precision: str, context: int, kv_bytes: int = 4) -> float:
        """Bytes one decode step must read: every matmul weight once, small fp32 tensors, one
        embedding row and the KV cache of `context` positions."""
        if precision not in BYTES_PER_PARAM:
            raise ValueError(f"unknown precision {precision!r}; known: {', '.join(BYTES_PER_PARAM)}")
        weights = self.matmul_params * BYTES_PER_PARAM[precision]
        small = (self.num_layers * self.layer_small_params + 2 * self.hidden_size) * 4
        return weights + small + context * self.kv_bytes_per_position(kv_bytes)

    def prefill_flops(self, tokens: int, lm_head_positions: int = 1) -> float:
        """FLOPs a prefill of `tokens` needs: projections, causal attention (QK^T and AV over the
        lower triangle) and the LM head at `lm_head_positions` positions (1 = only what generation
        needs; engines that compute logits for every position do `tokens` of them)."""
        proj = 2.0 * self.num_layers * self.layer_matmul_params * tokens
        attn = 2.0 * 2.0 * self.num_layers * self.num_heads * self.head_dim * tokens * (tokens + 1) / 2
        head = 2.0 * self.hidden_size * self.vocab_size * lm_head_positions
        return proj + attn + head


def decode_roofline(cost: DecoderCost, precision: str, context: int, bandwidth_gbs: float) -> float:
    """Upper bound on decode tokens/s at `context` cached positions: bandwidth / bytes per token."""
    return bandwidth_gbs * 1e9 / cost.decode_bytes_per_token(precision, context)


def roofline_row(cost: DecoderCost, precision: str, prompt_tokens: int, new_tokens: int,
                 decode_tok_s: float | None, prefill_ms: float | None, limits: MachineLimits) -> dict[str, Any]:
    """Where one measured run sits: decode vs the bandwidth roofline, prefill vs matmul FLOP/s.

    The context used for decode is the average over the generated tokens (prompt + new/2).
    """
    context = prompt_tokens + new_tokens // 2
    bpt = cost.decode_bytes_per_token(precision, context)
    roof = decode_roofline(cost, precision, context, limits.bandwidth_gbs)
    row: dict[str, Any] = {
        "precision": precision,
        "decode_bytes_per_token_mb": bpt / 1e6,
        "decode_roofline_tok_s": roof,
        "decode_tok_s": decode_tok_s,
        "decode_fraction_of_roofline": (decode_tok_s / roof) if decode_tok_s else None,
        "decode_effective_gbs": (decode_tok_s * bpt / 1e9) if decode_tok_s else None,
    }
    flops = cost.prefill_flops(prompt_tokens)
    achieved = flops / (prefill_ms / 1e3) / 1e9 if prefill_ms else None
    row.update({
        "prefill_gflop": flops / 1e9,
        "prefill_ms": prefill_ms,
        "prefill_achieved_gflops": achieved,
        "prefill_fraction_of_matmul": (achieved / limits.matmul_gflops) if achieved else None,
    })
    return row
