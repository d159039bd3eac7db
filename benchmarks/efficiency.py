"""The paper's efficiency claim, measured: hybrid vs continuous vs discrete visual tokens.

MaVEn keeps 32 discrete codes plus ``floor(keep_ratio * N)`` selected patches per image
(hybrid) instead of all N projected patches (continuous, LLaVA-1.5 style); discrete-only keeps
just the codes. Fewer visual tokens mean a shorter prefill, so a faster time to first token
(TTFT), paid for by the extra h_eos pass and the selector. This module

- computes the token math for a config (:func:`token_table`): visual tokens per image and
  prompt tokens for ``n`` images in each mode;
- summarises a measured pipeline sweep (:func:`summarize`): for each image count, the prefill
  tokens, TTFT and prefill time per mode, the visual-token reduction hybrid vs continuous and
  the TTFT / prefill speed-ups, next to the FLOP ratio the token counts predict for the prefill.

    maven-edge bench --preset edge-small --sections pipeline --modes hybrid,continuous,discrete --images 1,2,4,8
    maven-edge bench --preset paper --set llm.num_layers=4 --set vision.num_layers=3 --backends torch ...

(the ``paper`` geometry runs with reduced depth: the same fraction of the ViT-L and of the
Vicuna-7B layers, so the vision / LLM cost balance of the full model is kept).
"""

from __future__ import annotations

from typing import Any

from maven_edge.benchmarks.roofline import DecoderCost
from maven_edge.core.config import VISUAL_MODES, MavenConfig

#: Tokens of the benchmark prompt besides the images (see maven_edge.benchmarks.worker.pipeline_prompt).
PROMPT_TEXT = "\nQuestion: what is in the images?\nAnswer:"


def token_table(cfg: MavenConfig, images: list[int], text_tokens: int = 0) -> list[dict[str, Any]]:
    """Per mode and image count: visual tokens per image (without start/end markers) and the
    prompt length (each image adds its tokens + <img_start> + <img_end>)."""
    rows = []
    for mode in VISUAL_MODES:
        per = cfg.visual_tokens_per_image(mode)
        for n in images:
            rows.append({"mode": mode, "images": n, "visual_tokens_per_image": per,
                         "prompt_tokens": text_tokens + n * (per + 2)})
    return rows


def _median(cell: dict[str, Any], key: str) -> float | None:
    s = (cell.get("stats") or {}).get(key)
    return s["median"] if s else None


def summarize(pipeline: dict[str, Any], cfg: MavenConfig, backend: str) -> dict[str, Any]:
    """Efficiency table from one backend's pipeline sweep (``task_pipeline`` result)."""
    cells = [c for c in pipeline.get("cells", []) if c.get("status") == "measured"]
    by = {(c["mode"], c["images"]): c for c in cells}
    cost = DecoderCost.from_llm(cfg.llm, cfg.vocab_size)
    images = sorted({c["images"] for c in cells})
    rows = []
    for n in images:
        row: dict[str, Any] = {"images": n}
        for mode in VISUAL_MODES:
            c = by.get((mode, n))
            if c is None:
                continue
            row[mode] = {
                "visual_tokens_per_image": c.get("visual_tokens_per_image"),
                "prompt_tokens": c.get("prompt_tokens"),
                "ttft_ms": _median(c, "ttft_ms"),
                "prefill_ms": _median(c, "prefill_ms"),
                "visual_ms": _median(c, "visual_ms"),
                "ttft_spread": (c["stats"].get("ttft_ms") or {}).get("spread"),
            }
        h, cont, d = row.get("hybrid"), row.get("continuous"), row.get("discrete")
        if h and cont and n:
            row["visual_token_reduction"] = cont["visual_tokens_per_image"] / h["visual_tokens_per_image"]
            row["prompt_token_reduction"] = cont["prompt_tokens"] / h["prompt_tokens"]
            row["prefill_flop_ratio"] = cost.prefill_flops(cont["prompt_tokens"]) / cost.prefill_flops(h["prompt_tokens"])
            if h["ttft_ms"] and cont["ttft_ms"]:
                row["ttft_speedup_hybrid_vs_continuous"] = cont["ttft_ms"] / h["ttft_ms"]
            if h["prefill_ms"] and cont["prefill_ms"]:
                row["prefill_speedup_hybrid_vs_continuous"] = cont["prefill_ms"] / h["prefill_ms"]
        if d and cont and n and d["ttft_ms"] and cont["ttft_ms"]:
            row["ttft_speedup_discrete_vs_continuous"] = cont["ttft_ms"] / d["ttft_ms"]
        rows.append(row)
    four = next((r for r in rows if r["images"] == 4), None)
    claim = None
    if four and "ttft_speedup_hybrid_vs_continuous" in four:
        s = four["ttft_speedup_hybrid_vs_continuous"]
        claim = {"images": 4, "ttft_speedup": s, "holds_2x": s >= 2.0,
                 "visual_token_reduction": four.get("visual_token_reduction"),
                 "prefill_flop_ratio": four.get("prefill_flop_ratio")}
    return {
        "backend": backend,
        "preset": cfg.name,
        "geometry": {"patches": cfg.num_patches, "codes": cfg.discrete.num_codes, "kept": cfg.num_kept_patches(),
                     "keep_ratio": cfg.selector.keep_ratio, "llm_layers": cfg.llm.num_layers,
                     "vision_layers": cfg.vision.num_layers, "llm_hidden": cfg.llm.hidden_size,
                     "vision_hidden": cfg.vision.hidden_size},
        "rows": rows,
        "claim_4_images": claim,
    }
