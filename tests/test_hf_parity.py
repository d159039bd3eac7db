"""Parity with Hugging Face transformers on small random models, KV-cache correctness, HF import.

Reference models: CLIPVisionModel (patch features = hidden_states[feature_layer][:, 1:]),
LlamaForCausalLM, Qwen2ForCausalLM (q/k/v biases, tied embeddings). All fp32, eager attention.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from maven_edge.core.config import LLMConfig, get_config  # noqa: E402
from maven_edge.core.errors import CheckpointError, ConfigError, MavenError  # noqa: E402
from maven_edge.model_src.hf_import import (  # noqa: E402
    decoder_from_hf,
    llm_config_from_hf,
    load_clip_vision,
    load_hf_decoder,
    save_hf_llama,
    to_hf_llama,
    vision_config_from_hf,
    vision_encoder_from_hf,
)
from maven_edge.model_src.modeling.decoder import LlamaDecoder, positions_from_mask  # noqa: E402
from maven_edge.model_src.modeling.vision import VisionEncoder  # noqa: E402

ATOL = 1e-4
VOCAB = 300
CLIP_KW = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
)
LLM_KW = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
)


def _seeded(seed: int):
    torch.manual_seed(seed)


def make_clip(seed: int = 0) -> CLIPVisionModel:
    _seeded(seed)
    return CLIPVisionModel(CLIPVisionConfig(attn_implementation="eager", **CLIP_KW)).eval()


def make_llm(kind: str, seed: int = 0, **kw):
    """'llama', 'qwen2' (random q/k/v biases) or 'qwen2-tied'."""
    _seeded(seed)
    args = {**LLM_KW, **kw}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(attn_implementation="eager", **args))
    else:
        model = Qwen2ForCausalLM(
            Qwen2Config(attn_implementation="eager", tie_word_embeddings=kind == "qwen2-tied", **args)
        )
        with torch.no_grad():  # HF initialises biases to zero, which would not test them
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like our loop
    model.generation_config.pad_token_id = 0
    return model.eval()


LLM_KINDS = ("llama", "qwen2", "qwen2-tied")


@pytest.fixture(scope="module", params=LLM_KINDS)
def llm_pair(request):
    hf = make_llm(request.param)
    return request.param, hf, decoder_from_hf(hf)


def logits_of(decoder: LlamaDecoder, ids, mask=None, position_ids=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return decoder(decoder.embed_tokens(ids), mask, position_ids)[0]


def greedy(decoder: LlamaDecoder, ids, mask, steps: int):
    """Greedy decode with the KV cache; returns (tokens [B, steps], logits per step)."""
    with torch.no_grad():
        logits, _, past = decoder(decoder.embed_tokens(ids), mask)
        tokens, step_logits = [], []
        for _ in range(steps):
            step_logits.append(logits[:, -1])
            tok = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
            logits, _, past = decoder(decoder.embed_tokens(tok), mask, None, past)
    return torch.cat(tokens, 1), step_logits


def left_padded(lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n :] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[b, width - n :] = 1
    return ids, mask


# ---- vision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_clip_patch_features(feature_layer):
    clip = make_clip()
    encoder = vision_encoder_from_hf(clip, feature_layer)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = clip(pixel_values=px, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        ours = encoder(px)
    assert ours.shape == (2, 16, 32)
    assert (ours - ref).abs().max() <= ATOL


def test_vision_config_from_hf():
    cfg = vision_config_from_hf(CLIPVisionConfig(**CLIP_KW), feature_layer=-2)
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (
        32,
        8,
        32,
        3,
        4,
    )
    assert (cfg.intermediate_size, cfg.hidden_act, cfg.feature_layer, cfg.num_patches) == (
        64,
        "quick_gelu",
        -2,
        16,
    )
    full = CLIPConfig(vision_config=CLIP_KW)
    assert vision_config_from_hf(full) == cfg  # a CLIPConfig's vision part
    assert vision_config_from_hf(CLIPVisionConfig(hidden_act="gelu_new", **CLIP_KW)).hidden_act == "gelu_tanh"
    with pytest.raises(ConfigError, match="unsupported vision activation 'relu'"):
        vision_config_from_hf(CLIPVisionConfig(hidden_act="relu", **CLIP_KW))
    with pytest.raises(ConfigError, match=r"feature_layer must be in \[-3, -1\]"):
        vision_config_from_hf(CLIPVisionConfig(**CLIP_KW), feature_layer=-4)
    with pytest.raises(ConfigError, match="expected a CLIP vision config"):
        vision_config_from_hf(LlamaConfig())


def test_load_clip_vision_from_full_clip_and_errors():
    _seeded(0)
    full = CLIPModel(
        CLIPConfig(
            vision_config=CLIP_KW,
            text_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                vocab_size=50,
            ),
            projection_dim=8,
        )
    )
    encoder = VisionEncoder(vision_config_from_hf(full.config, -1))
    load_clip_vision(encoder, full.state_dict())  # text tower and projections are ignored
    assert torch.equal(
        encoder.encoder.layers[2].mlp.fc2.weight, full.vision_model.encoder.layers[2].mlp.fc2.weight
    )
    wide = VisionEncoder(vision_config_from_hf(CLIPVisionConfig(**{**CLIP_KW, "hidden_size": 48})))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*embeddings") as exc:
        load_clip_vision(wide, full)
    assert isinstance(exc.value, MavenError)
    state = {k: v for k, v in full.state_dict().items() if "layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*encoder\.layers\.1\."):
        load_clip_vision(encoder, state)
    with pytest.raises(CheckpointError, match="expected a CLIP vision model or a state dict"):
        load_clip_vision(encoder, 42)


# ---- decoder logits --------------------------------------------------------------------------


def test_llm_config_from_hf(llm_pair):
    kind, hf, decoder = llm_pair
    cfg = decoder.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size) == (
        64,
        2,
        4,
        2,
        128,
    )
    assert cfg.text_vocab_size == VOCAB and decoder.vocab_size == VOCAB
    assert cfg.attention_bias == kind.startswith("qwen2")
    assert cfg.tie_word_embeddings == (kind == "qwen2-tied")
    assert (decoder.lm_head.weight is decoder.embed_tokens.weight) == cfg.tie_word_embeddings
    assert llm_config_from_hf(hf.config, VOCAB + 20).text_vocab_size == VOCAB + 20


def test_decoder_logits_match(llm_pair):
    _, hf, decoder = llm_pair
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (logits_of(decoder, ids) - ref).abs().max() <= ATOL


def test_greedy_20_steps_match_hf_generate(llm_pair):
    _, hf, decoder = llm_pair
    ids, mask = left_padded([9])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[
            :, ids.shape[1] :
        ]
    ours, _ = greedy(decoder, ids, mask, 20)
    assert ref.shape == (1, 20)
    assert ours.tolist() == ref.tolist()


def test_greedy_batched_left_padding_matches_hf(llm_pair):
    _, hf, decoder = llm_pair
    ids, mask = left_padded([5, 11, 8], seed=4)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[
            :, ids.shape[1] :
        ]
    ours, _ = greedy(decoder, ids, mask, 20)
    assert ours.tolist() == ref.tolist()
    # ... and each row equals decoding that prompt alone, without padding
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()][None]
        alone, _ = greedy(decoder, real, torch.ones_like(real), 20)
        assert alone.tolist() == ours[b : b + 1].tolist()


def test_left_padded_logits_match_hf(llm_pair):
    _, hf, decoder = llm_pair
    ids, mask = left_padded([4, 10])
    pos = positions_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ours = logits_of(decoder, ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= ATOL


# ---- KV cache ----------------------------------------------------------------------------------


def test_incremental_decode_equals_full_recompute(llm_pair):
    _, _, decoder = llm_pair
    ids, mask = left_padded([6, 13, 9], seed=7)
    tokens, step_logits = greedy(decoder, ids, mask, 8)
    full_ids = torch.cat([ids, tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    full = logits_of(decoder, full_ids, full_mask)  # no cache: one pass over everything
    for i, step in enumerate(step_logits):
        assert (step - full[:, ids.shape[1] - 1 + i]).abs().max() <= ATOL


def test_chunked_prefill_equals_single_pass(llm_pair):
    _, _, decoder = llm_pair
    ids, mask = left_padded([7, 12], seed=8)
    with torch.no_grad():
        full = decoder(decoder.embed_tokens(ids), mask)[0]
        first, _, past = decoder(decoder.embed_tokens(ids[:, :5]), mask[:, :5])
        assert all(k.shape[2] == 5 for k, _ in past)
        second, _, present = decoder(decoder.embed_tokens(ids[:, 5:]), mask, None, past)
        assert all(k.shape[2] == ids.shape[1] for k, _ in present)
    real = mask.bool()
    both = torch.cat([first, second], 1)
    assert (both[real] - full[real]).abs().max() <= ATOL


# ---- expanded vocabulary, reverse direction --------------------------------------------------


def test_decoder_from_hf_expands_vocab(llm_pair):
    kind, hf, _ = llm_pair
    decoder = decoder_from_hf(hf, codebook_size=64, text_vocab_size=VOCAB + 20, seed=3)
    assert decoder.vocab_size == VOCAB + 20 + 64 and decoder.config.text_vocab_size == VOCAB + 20
    assert torch.equal(decoder.embed_tokens.weight[:VOCAB], hf.model.embed_tokens.weight)
    assert torch.equal(decoder.lm_head.weight[:VOCAB], hf.lm_head.weight)
    assert (decoder.lm_head.weight is decoder.embed_tokens.weight) == (kind == "qwen2-tied")
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (logits_of(decoder, ids)[..., :VOCAB] - ref).abs().max() <= ATOL
    # decoder weights are copies, not views of the HF model
    assert decoder.layers[0].mlp.up_proj.weight.data_ptr() != hf.model.layers[0].mlp.up_proj.weight.data_ptr()


def test_to_hf_round_trip(llm_pair, tmp_path):
    kind, _, decoder = llm_pair
    hf = to_hf_llama(decoder)
    assert type(hf) is (Qwen2ForCausalLM if kind.startswith("qwen2") else LlamaForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - logits_of(decoder, ids)).abs().max() <= ATOL
    back = LlamaDecoder(decoder.config, decoder.vocab_size)
    load_hf_decoder(back, hf)
    a, b = decoder.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saved as a transformers folder and read back offline
    save_hf_llama(decoder, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    reread = type(hf).from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    with torch.no_grad():
        assert (reread(input_ids=ids).logits - logits_of(decoder, ids)).abs().max() <= ATOL


def test_to_hf_with_unified_vocab_and_tokenizer(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from maven_edge.core.tokenizer import TextTokenizer

    cfg = get_config(
        "tiny", ["llm.num_layers=1", "llm.hidden_size=64", "llm.num_heads=4", "llm.intermediate_size=96"]
    )
    _seeded(5)
    decoder = LlamaDecoder(cfg.llm, cfg.vocab_size).eval()
    hf = to_hf_llama(decoder)
    assert hf.config.vocab_size == cfg.vocab_size
    ids = torch.tensor([[1, 5, cfg.visual_offset + 3, cfg.vocab_size - 1]])
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - logits_of(decoder, ids)).abs().max() <= ATOL
    tok = TextTokenizer.default(cfg.llm.text_vocab_size, cfg.discrete.codebook_size)
    save_hf_llama(decoder, tmp_path / "hf", tokenizer=tok)
    reread = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert (reread.config.bos_token_id, reread.config.eos_token_id, reread.config.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert fast("red circle", add_special_tokens=False).input_ids == tok.encode("red circle")
    small = LlamaDecoder(LLMConfig(**{**cfg.llm.__dict__, "text_vocab_size": 300}), 300)
    with pytest.raises(CheckpointError, match="tokenizer has 503 ids"):
        save_hf_llama(small, tmp_path / "hf2", tokenizer=tok)


# ---- unsupported configs and mismatched weights --------------------------------------------


@pytest.mark.parametrize(
    "config,match",
    [
        (LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (LlamaConfig(attention_bias=True), "o_proj bias"),
        (LlamaConfig(mlp_bias=True), "mlp_bias"),
        (LlamaConfig(hidden_act="gelu"), "hidden_act 'gelu'"),
        (LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32), "head_dim 32"),
        (Qwen2Config(use_sliding_window=True, sliding_window=16), "sliding"),
        (CLIPVisionConfig(), "unsupported language model type 'clip_vision_model'"),
    ],
)
def test_unsupported_llm_configs(config, match):
    with pytest.raises(ConfigError, match=match):
        llm_config_from_hf(config)


def test_text_vocab_smaller_than_model():
    with pytest.raises(ConfigError, match="smaller than the model's vocabulary"):
        llm_config_from_hf(LlamaConfig(vocab_size=VOCAB), text_vocab_size=VOCAB - 1)


def test_decoder_weight_mismatches():
    hf = make_llm("llama")
    cfg = llm_config_from_hf(hf.config)
    narrow = LlamaDecoder(LLMConfig(**{**cfg.__dict__, "intermediate_size": 96}), VOCAB)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch.*mlp\.gate_proj\.weight: source \(128, 64\) vs ours \(96, 64\)",
    ):
        load_hf_decoder(narrow, hf)
    bigger_vocab = LlamaDecoder(cfg, VOCAB + 10)
    with pytest.raises(CheckpointError, match="embed_tokens"):
        load_hf_decoder(bigger_vocab, hf)
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\).*q_proj\.bias"):
        load_hf_decoder(LlamaDecoder(cfg, VOCAB), state)
    del state["model.layers.0.self_attn.q_proj.bias"], state["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*lm_head\.weight"):
        load_hf_decoder(LlamaDecoder(cfg, VOCAB), state)
    qwen_tied = make_llm("qwen2-tied")
    untied = LlamaDecoder(
        LLMConfig(**{**llm_config_from_hf(qwen_tied.config).__dict__, "tie_word_embeddings": False}), VOCAB
    )
    from safetensors.torch import load_file, save_file  # noqa: F401  (a file-like state: no lm_head)

    no_head = {k: v for k, v in qwen_tied.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError, match="lm_head"):
        load_hf_decoder(untied, no_head)


# ---- maven-edge import-hf ------------------------------------------------------------------------


def _hf_tokenizer_json(path):
    """A byte-level BPE like the ones HF models ship, without maven-edge's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the red circle is above the blue square"] * 5, trainer=trainer)
    tok.save(str(path))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _seeded(0)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=CLIP_KW,
            text_config=dict(
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                vocab_size=50,
            ),
            projection_dim=8,
        )
    )
    clip.save_pretrained(str(root / "clip"))
    (root / "clip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2})
    )
    make_llm("qwen2-tied", seed=1).save_pretrained(str(root / "qwen2"))
    bpe_size = _hf_tokenizer_json(root / "qwen2" / "tokenizer.json")
    make_llm("llama", seed=2, vocab_size=200).save_pretrained(str(root / "llama"))
    return root, clip, bpe_size


def _cli(args, capsys):
    from maven_edge.cli import main

    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_import_hf_qwen2_clip(hf_dirs, tmp_path, capsys, make_pixels):
    from maven_edge.core.tokenizer import SPECIAL_TOKENS
    from maven_edge.model_src.checkpoint import load_checkpoint

    root, clip, bpe_size = hf_dirs
    out = tmp_path / "ckpt"
    rc, stdout, err = _cli(
        [
            "import-hf",
            "--llm",
            str(root / "qwen2"),
            "--vision",
            str(root / "clip"),
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--set",
            "selector.keep_ratio=0.5",
            "--seed",
            "7",
        ],
        capsys,
    )
    assert rc == 0, err
    assert "verified against Hugging Face" in stdout
    model = load_checkpoint(out)
    cfg = model.config
    assert cfg.llm.attention_bias and cfg.llm.tie_word_embeddings and cfg.llm.hidden_size == 64
    assert cfg.vision.hidden_size == 32 and cfg.vision.feature_layer == -2 and cfg.num_patches == 16
    assert cfg.preprocess.image_size == 32 and cfg.preprocess.mean == (0.5, 0.4, 0.3)
    assert cfg.preprocess.resample == "bilinear"
    assert cfg.selector.keep_ratio == 0.5 and cfg.discrete.codebook_size == 256  # from the preset / --set
    assert cfg.llm.text_vocab_size == VOCAB and cfg.vocab_size == VOCAB + 256
    lay = model.tokenizer.layout
    assert sorted(lay.special_ids.values()) == list(range(bpe_size, bpe_size + len(SPECIAL_TOKENS)))
    assert model.tokenizer.encode("the red circle") != []
    # the LLM and the ViT reproduce the HF models
    hf = Qwen2ForCausalLM.from_pretrained(str(root / "qwen2"), local_files_only=True).eval()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (logits_of(model.llm, ids)[..., :VOCAB] - hf(input_ids=ids).logits).abs().max() <= ATOL
        px = make_pixels(2, cfg=cfg)
        ref = clip.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (model.vision(px) - ref).abs().max() <= ATOL
    info = json.loads((out / "import_info.json").read_text())
    assert (
        info["llm_type"] == "qwen2" and info["seed"] == 7 and info["verify"]["llm_logits_max_abs_diff"] < ATOL
    )
    ids, _ = model.generate(make_pixels(1, cfg=cfg), "<image> what is it?")
    assert len(ids) >= 1


def test_import_hf_llama_default_tokenizer(hf_dirs, tmp_path, capsys):
    from maven_edge.model_src.checkpoint import load_checkpoint

    root, _, _ = hf_dirs
    out = tmp_path / "ckpt"
    rc, stdout, err = _cli(
        ["import-hf", "--llm", str(root / "llama"), "--preset", "tiny", "--out", str(out), "--no-verify"],
        capsys,
    )
    assert rc == 0, err
    assert "default BPE" in stdout
    model = load_checkpoint(out)
    # 200 HF tokens < 503 maven-edge BPE ids: the text vocabulary grows to the next multiple of 64
    assert model.config.llm.text_vocab_size == 512 and not model.config.llm.attention_bias
    assert model.config.vision == get_config("tiny").vision  # no --vision: the preset's ViT
    hf = LlamaForCausalLM.from_pretrained(str(root / "llama"), local_files_only=True).eval()
    assert torch.equal(model.llm.embed_tokens.weight[:200], hf.model.embed_tokens.weight)
    # same seed -> same random parts
    rc, _, _ = _cli(
        [
            "import-hf",
            "--llm",
            str(root / "llama"),
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--no-verify",
            "--force",
        ],
        capsys,
    )
    again = load_checkpoint(out)
    assert rc == 0 and torch.equal(again.selector.layers[0].weight, model.selector.layers[0].weight)


def test_import_hf_errors(hf_dirs, tmp_path, capsys):
    root, _, _ = hf_dirs
    base = ["import-hf", "--preset", "tiny", "--out", str(tmp_path / "o")]
    cases = [
        (["--llm", str(tmp_path / "missing")], "directory not found"),
        (["--llm", str(tmp_path)], "no config.json"),
        (["--llm", str(root / "qwen2"), "--vision", str(tmp_path / "nope")], "--vision"),
        (["--llm", str(root / "clip")], "model_type 'clip' is not supported"),
        (["--llm", str(root / "qwen2"), "--vision", str(root / "llama")], "expected a CLIP vision config"),
        (
            ["--llm", str(root / "qwen2"), "--vision", str(root / "clip"), "--feature-layer", "-9"],
            "feature_layer",
        ),
        (
            ["--llm", str(root / "qwen2"), "--set", "llm.hidden_size=128"],
            "llm.hidden_size come(s) from the Hugging Face",
        ),
        (["--llm", str(root / "qwen2"), "--set", "llm.nope=1"], "unknown config field"),
        (["--llm", str(root / "qwen2"), "--tokenizer", str(tmp_path / "t.json")], "tokenizer file not found"),
    ]
    for extra, match in cases:
        rc, _, err = _cli(base + extra, capsys)
        assert rc == 2 and match in err, (extra, err)
        assert "Traceback" not in err
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_hidden_layers": 1,
                "intermediate_size": 32,
                "vocab_size": 100,
            }
        )
    )
    rc, _, err = _cli(base[:-1] + [str(tmp_path / "o2"), "--llm", str(bad)], capsys)
    assert rc == 2 and "cannot load the language model" in err
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    rc, _, err = _cli(
        ["import-hf", "--llm", str(root / "qwen2"), "--preset", "tiny", "--out", str(full)], capsys
    )
    assert rc == 2 and "--force" in err and (full / "x").read_text() == "keep me"
    (tmp_path / "afile").write_text("")
    rc, _, err = _cli(
        [
            "import-hf",
            "--llm",
            str(root / "qwen2"),
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "afile"),
            "--force",
        ],
        capsys,
    )
    assert rc == 2 and "is a file" in err
    with pytest.raises(SystemExit):
        _cli(["import-hf", "--llm", str(root / "qwen2"), "--preset", "huge", "--out", str(full)], capsys)


def test_import_hf_help(capsys):
    from maven_edge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["import-hf", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "--llm DIR",
        "--vision DIR",
        "--preset",
        "--out",
        "local",
        "no downloads",
        "tokenizer.json",
        "expand",
        "Qwen2ForCausalLM",
        "CLIPVisionModel",
    ):
        assert needle in text.replace("\n", " ") or needle in text, needle


def test_command_modules_import_without_torch():
    code = (
        "import sys; import maven_edge.model_src.hf_commands, maven_edge.model_src.hf_import; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1])
    )
