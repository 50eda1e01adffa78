#!/usr/bin/env python3
"""Reference-fixture generator for mlaserve (tiny DeepSeek V2 / V2-Lite / V3 / V3-FP8 models).

Run by hand (never in CI):

    /work/pyref/bin/python tools/make_fixtures.py            # regenerate tests/fixtures/*
    /work/pyref/bin/python tools/make_fixtures.py --check    # regenerate into a temp dir, compare bytes

It writes, for each of `v2-lite`, `v2`, `v3`, `v3-fp8`, a Hugging Face model folder under
tests/fixtures/<name>/ (config.json in the deepseek-ai hub format, generation_config.json,
tokenizer.json, tokenizer_config.json, safetensors weights) plus reference.json with the logits and
greedy continuations computed by transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM in
float32 (eager attention) on exactly the stored weights.

Everything is seeded: a re-run produces the same bytes (single-threaded torch). The script also
  * checks that this transformers version follows the spec (softmax scale, YaRN frequencies and
    cos/sin factor, rope layout) and patches the attention scale if it does not;
  * cross-checks HF against an independent pure-torch forward written from
    shared/design/deepseek-models.md (§3-§6): |Δ last_logits| < 1e-4, |Δ logits| < 2.5e-4 at every
    greedy step (our forward decodes with a KV cache, HF recomputes the full sequence);
  * checks numerical robustness, so an f32 port (the Rust model) can match at 1e-3 without flaky
    tokens: HF f32 vs a float64 evaluation < 2.5e-4, greedy top1-top2 margin > 1e-3 at every step,
    and every MoE routing decision (expert top-k and group top-k) separated by > 20x the f32 error
    of the router scores;
  * runs mutation checks: deliberately broken variants of that forward (NeoX rope on interleaved
    weights, missing mscale², ignored correction bias, wrong group selection, decode position off by
    one, misapplied FP8 scales, no vocab mask, ...) must each change the 32-token greedy
    continuation of at least one prompt, otherwise the weights are too "flat" to catch that bug and
    the script exits non-zero.

See tools/README.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoConfig, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM  # noqa: E402

torch.set_num_threads(1)  # deterministic reductions; tiny ops gain nothing from threads

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
CHAT_TEMPLATE_CANDIDATES = [
    REPO / "shared" / "testdata" / "chat-templates" / "deepseek-r1.jinja",
    REPO.parent / "shared" / "testdata" / "chat-templates" / "deepseek-r1.jinja",
    Path("/work/shared/testdata/chat-templates/deepseek-r1.jinja"),
]

N_GREEDY = 32
LOGIT_TOL_HF_VS_REF = 1e-4    # last prompt position (the fixture's last_logits)
LOGIT_TOL_STEPS = 2.5e-4      # every greedy step (decode path with cache vs HF full recompute)
MIN_GREEDY_MARGIN = 1e-3      # top1 - top2 (real ids) at every greedy step, every prompt
F64_TOL = 2.5e-4              # HF f32 logits vs float64 ground truth: keeps any f32 port within ~2x that
ROUTER_GAP_FACTOR = 20.0      # fp64 routing decision gap must exceed 20x the f32-vs-fp64 router score error
MIN_ROUTER_GAP = 1e-5
MAX_ABS_LOGIT = 50.0
MAX_FOLDER_BYTES = 1_000_000

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
TOKENIZER_TRAIN_VOCAB = 472   # 3 specials + 256 byte symbols + 213 merges; +4 added tokens = 476 ids
CONFIG_VOCAB = 512            # rows of embed_tokens / lm_head (padding rows 476..511, like 129280 vs 128815)

EN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little village near the river.",
    "The weather is nice today, so we will walk to the park.",
    "Machine learning models are trained on large amounts of text.",
    "She opened the window and the cold morning air filled the room.",
    "Please remember to save your work before you close the program.",
    "The train leaves the station at seven in the evening.",
    "He wrote a long letter to his friend who lived in another country.",
    "Water boils at one hundred degrees at sea level.",
    "The cat sat on the mat and looked at the bird outside.",
    "We need more time to finish the project and test every part of it.",
    "The history of the city goes back more than a thousand years.",
    "A good teacher explains hard ideas with simple words.",
    "The market was full of people buying fresh fruit and bread.",
    "They played music in the garden until the sun went down.",
    "What is the capital of France? The capital of France is Paris.",
    "The server answers every request with a short message.",
    "Attention layers compare each token with the tokens before it.",
    "The numbers in the table show the results of the last experiment.",
    "Every morning the old man feeds the birds in the square.",
    "The library opens at nine and closes at six on weekdays.",
    "Light travels faster than sound, which is why we see lightning first.",
    "The children laughed when the dog tried to catch its own tail.",
    "Good software is simple, fast and easy to change.",
    "The mountain road was narrow, steep and covered with snow.",
    "I think that the answer is correct, but let me check it again.",
    "The model reads the prompt and then writes the answer one token at a time.",
    "Two plus two is four, and three times three is nine.",
]
ZH_SENTENCES = [
    "今天天气很好，我们去公园散步吧。",
    "我喜欢读书，也喜欢听音乐。",
    "这个问题很有意思，我们一起想一想。",
    "中国的首都是北京，法国的首都是巴黎。",
    "他每天早上七点起床，然后去上班。",
    "机器学习模型需要大量的数据来训练。",
    "请在关闭程序之前保存你的工作。",
    "小猫坐在窗户旁边看外面的小鸟。",
    "我们明天早上在学校门口见面。",
    "这本书讲的是一个关于友谊的故事。",
    "你好，世界！欢迎来到深度学习的世界。",
    "水在一百度的时候会沸腾。",
]


def build_corpus() -> list[str]:
    rng = random.Random(20240607)
    lines = []
    for _ in range(1500):
        kind = rng.random()
        if kind < 0.55:
            k = rng.randint(1, 3)
            lines.append(" ".join(rng.choice(EN_SENTENCES) for _ in range(k)))
        elif kind < 0.80:
            k = rng.randint(1, 2)
            lines.append("".join(rng.choice(ZH_SENTENCES) for _ in range(k)))
        elif kind < 0.92:
            a, b = rng.randint(0, 9999), rng.randint(0, 999)
            lines.append(f"{a} + {b} = {a + b}. In {rng.randint(1900, 2030)} there were {rng.randint(2, 500)} items.")
        else:
            lines.append(f"{rng.choice(EN_SENTENCES)} {rng.choice(ZH_SENTENCES)} {rng.randint(0, 100000)}")
    return lines


def train_tokenizer() -> str:
    """Train the shared byte-level BPE; return tokenizer.json text (DeepSeek-V3-style pipeline)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    # Same pre-tokenizer pipeline as DeepSeek-V3's tokenizer.json: digits in groups of <= 3,
    # CJK runs isolated, a GPT-style split, then ByteLevel without its own regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
        pre_tokenizers.Split(Regex("[一-龥\u3040-ゟ゠-ヿ]+"), behavior="isolated", invert=False),
        pre_tokenizers.Split(
            Regex("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|"
                  " ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
            behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                for t in (BOS, EOS, PAD)]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_TRAIN_VOCAB, min_frequency=2, show_progress=False,
        special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    # Chat-role / reasoning markers are added tokens with special=false, as in DeepSeek-R1.
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=True, special=False)
                    for t in (USER, ASSISTANT, THINK, THINK_END)])
    return tok.to_str(pretty=True)


# --------------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------------
SPECS = {
    "v2-lite": dict(
        arch="DeepseekV2ForCausalLM", model_type="deepseek_v2", seed=1001, dtype="float32",
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, moe_layer_freq=1, scoring_func="softmax", topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
        rope=dict(factor=4, original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                  mscale=0.707, mscale_all_dim=0.707),
        shards=1),
    "v2": dict(
        arch="DeepseekV2ForCausalLM", model_type="deepseek_v2", seed=2003, dtype="float16",
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, intermediate_size=128,
        moe_intermediate_size=24, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=3,
        first_k_dense_replace=1, moe_layer_freq=1, scoring_func="softmax", topk_method="group_limited_greedy",
        n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.0,
        rope=dict(factor=4, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
                  mscale=1.0, mscale_all_dim=1.0),
        shards=2),
    "v3": dict(
        arch="DeepseekV3ForCausalLM", model_type="deepseek_v3", seed=3017, dtype="bfloat16",
        hidden_size=56, num_hidden_layers=3, num_attention_heads=4, q_lora_rank=40, kv_lora_rank=36,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=12, intermediate_size=100,
        moe_intermediate_size=20, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        first_k_dense_replace=1, moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc",
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope=dict(factor=4, original_max_position_embeddings=1024, beta_fast=32, beta_slow=1,
                  mscale=1.0, mscale_all_dim=0.8),
        num_nextn_predict_layers=1, shards=1),
}
SPECS["v3-fp8"] = dict(SPECS["v3"], fp8_block=[16, 32], base="v3")

FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj")

# Weight scale knobs ("gains"): std = gain / sqrt(fan_in).  Chosen so that every mutation check
# below flips at least one greedy token while |logits| stays well below 50.
GAIN = dict(
    embed=1.0, q=1.3, q_a=1.0, k_pe=1.3, k_nope=1.3, v=1.0, o=1.0, mlp_in=1.5, mlp_down=1.0,
    router_softmax=3.0, router_sigmoid=2.5, bias=0.3, lm_head=2.5, lm_head_pad=1.7,
    channel_lognorm=0.3,  # per-row/per-column log-normal multipliers on every linear
)


def layer_is_moe(spec, i):
    return (spec["n_routed_experts"] is not None and i >= spec["first_k_dense_replace"]
            and i % spec["moe_layer_freq"] == 0)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
class WeightGen:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def normal(self, shape, std):
        return self.rng.standard_normal(shape, dtype=np.float64) * std

    def linear(self, out_f, in_f, gain, row_gain=None):
        w = self.normal((out_f, in_f), gain / math.sqrt(in_f))
        cl = GAIN["channel_lognorm"]
        w *= np.exp(cl * self.rng.standard_normal((out_f, 1)))
        w *= np.exp(cl * self.rng.standard_normal((1, in_f)))
        if row_gain is not None:
            w *= row_gain[:, None]
        return w

    def norm(self, n):
        return self.rng.uniform(0.6, 1.4, size=n)


def gen_block(spec, g: WeightGen, p: str, moe: bool) -> dict:
    H, nh = spec["hidden_size"], spec["num_attention_heads"]
    dn, dr, dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
    rq, rkv = spec["q_lora_rank"], spec["kv_lora_rank"]
    W = {}
    W[p + "input_layernorm.weight"] = g.norm(H)
    if rq is None:
        W[p + "self_attn.q_proj.weight"] = g.linear(nh * (dn + dr), H, GAIN["q"])
    else:
        W[p + "self_attn.q_a_proj.weight"] = g.linear(rq, H, GAIN["q_a"])
        W[p + "self_attn.q_a_layernorm.weight"] = g.norm(rq)
        W[p + "self_attn.q_b_proj.weight"] = g.linear(nh * (dn + dr), rq, GAIN["q"])
    rows = np.concatenate([np.full(rkv, 1.0), np.full(dr, GAIN["k_pe"])])
    W[p + "self_attn.kv_a_proj_with_mqa.weight"] = g.linear(rkv + dr, H, 1.0, row_gain=rows)
    W[p + "self_attn.kv_a_layernorm.weight"] = g.norm(rkv)
    rows = np.tile(np.concatenate([np.full(dn, GAIN["k_nope"]), np.full(dv, GAIN["v"])]), nh)
    W[p + "self_attn.kv_b_proj.weight"] = g.linear(nh * (dn + dv), rkv, 1.0, row_gain=rows)
    W[p + "self_attn.o_proj.weight"] = g.linear(H, nh * dv, GAIN["o"])
    W[p + "post_attention_layernorm.weight"] = g.norm(H)
    if not moe:
        inter = spec["intermediate_size"]
        W[p + "mlp.gate_proj.weight"] = g.linear(inter, H, GAIN["mlp_in"])
        W[p + "mlp.up_proj.weight"] = g.linear(inter, H, GAIN["mlp_in"])
        W[p + "mlp.down_proj.weight"] = g.linear(H, inter, GAIN["mlp_down"])
    else:
        E, im = spec["n_routed_experts"], spec["moe_intermediate_size"]
        rg = GAIN["router_sigmoid"] if spec["scoring_func"] == "sigmoid" else GAIN["router_softmax"]
        W[p + "mlp.gate.weight"] = g.normal((E, H), rg / math.sqrt(H))
        if spec["topk_method"] == "noaux_tc":
            W[p + "mlp.gate.e_score_correction_bias"] = g.rng.uniform(-GAIN["bias"], GAIN["bias"], size=E)
        for e in range(E):
            W[p + f"mlp.experts.{e}.gate_proj.weight"] = g.linear(im, H, GAIN["mlp_in"])
            W[p + f"mlp.experts.{e}.up_proj.weight"] = g.linear(im, H, GAIN["mlp_in"])
            W[p + f"mlp.experts.{e}.down_proj.weight"] = g.linear(H, im, GAIN["mlp_down"])
        ish = im * spec["n_shared_experts"]
        W[p + "mlp.shared_experts.gate_proj.weight"] = g.linear(ish, H, GAIN["mlp_in"])
        W[p + "mlp.shared_experts.up_proj.weight"] = g.linear(ish, H, GAIN["mlp_in"])
        W[p + "mlp.shared_experts.down_proj.weight"] = g.linear(H, ish, GAIN["mlp_down"])
    return W


def gen_weights(spec, tok_size) -> dict:
    """float64 numpy master weights (rounded to the storage dtype later)."""
    g = WeightGen(spec["seed"])
    V, H = CONFIG_VOCAB, spec["hidden_size"]
    W = {"model.embed_tokens.weight": g.normal((V, H), GAIN["embed"])}
    for i in range(spec["num_hidden_layers"]):
        W.update(gen_block(spec, g, f"model.layers.{i}.", layer_is_moe(spec, i)))
    W["model.norm.weight"] = g.norm(H)
    head = g.normal((V, H), GAIN["lm_head"] / math.sqrt(H))
    head[tok_size:] *= GAIN["lm_head_pad"]  # padding rows: strong, so an unmasked argmax picks them
    W["lm_head.weight"] = head
    # MTP module (DeepSeek-V3 §7): stored as model.layers.{num_hidden_layers}.*, skipped by loaders.
    for m in range(spec.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{spec['num_hidden_layers'] + m}."
        W[p + "embed_tokens.weight"] = W["model.embed_tokens.weight"].copy()
        W[p + "enorm.weight"] = g.norm(H)
        W[p + "hnorm.weight"] = g.norm(H)
        W[p + "eh_proj.weight"] = g.linear(H, 2 * H, 1.0)
        W.update(gen_block(spec, g, p, True))
        W[p + "shared_head.norm.weight"] = g.norm(H)
        W[p + "shared_head.head.weight"] = W["lm_head.weight"].copy()
    return W


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_storage(W: dict, dtype: str) -> dict:
    out = {}
    for k, v in W.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(torch.float32)
        if k.endswith("e_score_correction_bias"):
            out[k] = t.contiguous()  # always F32
        else:
            out[k] = t.to(TORCH_DTYPES[dtype]).contiguous()
    return out


def is_fp8_linear(name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in FP8_LINEARS


def fp8_quantize(w: torch.Tensor, block):
    """Block-wise FP8 E4M3 quantization as in DeepSeek-V3 checkpoints. Returns (w8, scale_inv)."""
    b0, b1 = block
    M, N = w.shape
    nM, nN = -(-M // b0), -(-N // b1)
    w = w.to(torch.float32)
    scale = torch.empty(nM, nN, dtype=torch.float32)
    for bi in range(nM):
        for bj in range(nN):
            amax = w[bi * b0:(bi + 1) * b0, bj * b1:(bj + 1) * b1].abs().max()
            scale[bi, bj] = torch.clamp(amax, min=1e-12) / 448.0
    s_full = scale.repeat_interleave(b0, 0)[:M].repeat_interleave(b1, 1)[:, :N]
    w8 = torch.clamp(w / s_full, -448.0, 448.0).to(torch.float8_e4m3fn)
    return w8.contiguous(), scale.contiguous()


def fp8_dequant(w8: torch.Tensor, s: torch.Tensor, block, mode="correct"):
    """W[i,j] = fp8(W8[i,j]) * scale_inv[i//b0, j//b1]; `mode` selects deliberately broken variants."""
    b0, b1 = block
    M, N = w8.shape
    nM, nN = s.shape
    w = w8.to(torch.float32)
    i = torch.arange(M)[:, None]
    j = torch.arange(N)[None, :]
    if mode == "correct":
        return w * s[i // b0, j // b1]
    if mode == "fp8_scales_ignored":
        return w
    if mode == "fp8_grid_misread":      # flat grid read as [nN, nM] and indexed [j//b1, i//b0]
        st = s.reshape(-1).reshape(nN, nM)
        return w * st[j // b1, i // b0]
    if mode == "fp8_block_swapped":     # weight_block_size read as [b1, b0]
        return w * s[torch.clamp(i // b1, max=nM - 1), torch.clamp(j // b0, max=nN - 1)]
    raise ValueError(mode)


def stored_to_f32(stored: dict, block=None, mode="correct") -> dict:
    """f32 view of the stored checkpoint (FP8 dequantized); *_scale_inv entries consumed."""
    out = {}
    for k, v in stored.items():
        if k.endswith("_scale_inv"):
            continue
        if v.dtype == torch.float8_e4m3fn:
            out[k] = fp8_dequant(v, stored[k + "_scale_inv"], block, mode)
        else:
            out[k] = v.to(torch.float32)
    return out


# --------------------------------------------------------------------------------------------
# Files: config.json (deepseek-ai hub format), generation_config.json, tokenizer files, weights
# --------------------------------------------------------------------------------------------
def hub_config(spec) -> dict:
    r = spec["rope"]
    c = {
        "architectures": [spec["arch"]],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": spec["first_k_dense_replace"],
        "hidden_act": "silu",
        "hidden_size": spec["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": spec["intermediate_size"],
        "kv_lora_rank": spec["kv_lora_rank"],
        "max_position_embeddings": r["factor"] * r["original_max_position_embeddings"],
        "model_type": spec["model_type"],
        "moe_intermediate_size": spec["moe_intermediate_size"],
        "moe_layer_freq": spec["moe_layer_freq"],
        "n_group": spec["n_group"],
        "n_routed_experts": spec["n_routed_experts"],
        "n_shared_experts": spec["n_shared_experts"],
        "norm_topk_prob": spec["norm_topk_prob"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_experts_per_tok": spec["num_experts_per_tok"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_key_value_heads": spec["num_attention_heads"],
    }
    if "num_nextn_predict_layers" in spec:
        c["num_nextn_predict_layers"] = spec["num_nextn_predict_layers"]
    c.update({
        "pretraining_tp": 1,
        "q_lora_rank": spec["q_lora_rank"],
        "qk_nope_head_dim": spec["qk_nope_head_dim"],
        "qk_rope_head_dim": spec["qk_rope_head_dim"],
    })
    if "fp8_block" in spec:
        c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": list(spec["fp8_block"])}
    c.update({
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": r["beta_fast"], "beta_slow": r["beta_slow"], "factor": r["factor"],
            "mscale": r["mscale"], "mscale_all_dim": r["mscale_all_dim"],
            "original_max_position_embeddings": r["original_max_position_embeddings"], "type": "yarn"},
        "rope_theta": 10000,
        "routed_scaling_factor": spec["routed_scaling_factor"],
        "scoring_func": spec["scoring_func"],
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": spec["topk_group"],
        "topk_method": spec["topk_method"],
        "torch_dtype": spec["dtype"],
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": spec["v_head_dim"],
        "vocab_size": CONFIG_VOCAB,
    })
    return c


def added_token_cfg(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def tokenizer_config(spec, chat_template) -> dict:
    r = spec["rope"]
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": added_token_cfg(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token_cfg(EOS),
        "legacy": True,
        "model_max_length": r["factor"] * r["original_max_position_embeddings"],
        "pad_token": added_token_cfg(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}


def write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def save_weights(folder: Path, stored: dict, shards: int):
    names = list(stored.keys())
    if shards == 1:
        save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(folder / "model.safetensors", 0o644)
        return ["model.safetensors"]
    # Split by cumulative byte size into `shards` files (deterministic, keeps names in order).
    sizes = [stored[n].numel() * stored[n].element_size() for n in names]
    total = sum(sizes)
    files, weight_map, acc = [], {}, 0
    groups = [[] for _ in range(shards)]
    for n, s in zip(names, sizes):
        gi = min(int(acc * shards / total), shards - 1)
        groups[gi].append(n)
        acc += s
    for gi, grp in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: stored[n] for n in grp}, str(folder / fname), metadata={"format": "pt"})
        os.chmod(folder / fname, 0o644)
        files.append(fname)
        for n in grp:
            weight_map[n] = fname
    write_json(folder / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return files


# --------------------------------------------------------------------------------------------
# YaRN (design doc §4)
# --------------------------------------------------------------------------------------------
def yarn_mscale(s, mu):
    return 0.1 * mu * math.log(s) + 1.0 if s > 1 else 1.0


def yarn_params(spec, truncate=True):
    r = spec["rope"]
    d, theta, s, L0 = spec["qk_rope_head_dim"], 10000.0, float(r["factor"]), r["original_max_position_embeddings"]

    def D(rot):
        return d * math.log(L0 / (2 * math.pi * rot)) / (2 * math.log(theta))

    lo_raw, hi_raw = D(r["beta_fast"]), D(r["beta_slow"])
    if truncate:
        low, high = max(math.floor(lo_raw), 0), min(math.ceil(hi_raw), d - 1)
    else:
        low, high = max(lo_raw, 0), min(hi_raw, d - 1)
    if low == high:
        high += 0.001
    i = np.arange(d // 2, dtype=np.float64)
    omega = theta ** (-2 * i / d)
    gamma = np.clip((i - low) / (high - low), 0, 1)
    m = 1 - gamma
    inv_freq = omega * m + (omega / s) * (1 - m)
    attn_factor = yarn_mscale(s, r["mscale"]) / yarn_mscale(s, r["mscale_all_dim"])
    d_qk = spec["qk_nope_head_dim"] + spec["qk_rope_head_dim"]
    tau = d_qk ** -0.5 * yarn_mscale(s, r["mscale_all_dim"]) ** 2
    return dict(low=low, high=high, low_raw=lo_raw, high_raw=hi_raw, inv_freq=inv_freq,
                plain_inv_freq=omega, attn_factor=attn_factor, tau=tau, tau_plain=d_qk ** -0.5)


# --------------------------------------------------------------------------------------------
# Independent pure-torch reference forward (design doc §3-§5), with mutation switches
# --------------------------------------------------------------------------------------------
class RefModel:
    """Follows shared/design/deepseek-models.md literally. f32 everywhere, router in f32.

    `mut` is a set of deliberately broken behaviours (for the mutation checks)."""

    def __init__(self, spec, W: dict, mut=frozenset(), dtype=torch.float32):
        self.dt = dtype
        self.s, self.W, self.mut = spec, {k: v.to(dtype) for k, v in W.items()}, set(mut)
        self.nh = spec["num_attention_heads"]
        self.dn, self.dr, self.dv = spec["qk_nope_head_dim"], spec["qk_rope_head_dim"], spec["v_head_dim"]
        y = yarn_params(spec, truncate="yarn_no_truncate" not in self.mut)
        inv = y["plain_inv_freq"] if "yarn_off" in self.mut else y["inv_freq"]
        self.inv_freq = torch.tensor(inv, dtype=dtype)   # fp64 values rounded once to the compute dtype
        self.attn_factor = 1.0 if "cos_sin_mscale_ignored" in self.mut else y["attn_factor"]
        self.tau = y["tau_plain"] if "no_mscale2" in self.mut else y["tau"]
        r = spec["rope"]
        if "tau_uses_mscale" in self.mut:     # mscale instead of mscale_all_dim in the softmax scale
            self.tau = y["tau_plain"] * yarn_mscale(r["factor"], r["mscale"]) ** 2
        if "tau_absorbed_dim" in self.mut:    # scale from the absorbed 576-like key width, not d_qk
            self.tau = (spec["kv_lora_rank"] + self.dr) ** -0.5 * yarn_mscale(r["factor"], r["mscale_all_dim"]) ** 2
        self.trace = []            # per routing call: router scores ("unit") and decision gaps
        self.mask_fill_mismatch = 0

    @staticmethod
    def rms(x, w, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(self, x, pos):  # x [..., T, d_r], pos [T]
        ang = pos.to(self.dt)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(ang) * self.attn_factor, torch.sin(ang) * self.attn_factor
        if "rope_neox" in self.mut:  # NeoX rotate_half applied to the raw (interleaved) layout: wrong
            h = x.shape[-1] // 2
            x1, x2 = x[..., :h], x[..., h:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        x0, x1 = x[..., 0::2], x[..., 1::2]   # interleaved pairs (2i, 2i+1) rotate with omega_i
        return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)

    def mlp(self, x, p):
        W = self.W
        return F.linear(F.silu(F.linear(x, W[p + "gate_proj.weight"])) * F.linear(x, W[p + "up_proj.weight"]),
                        W[p + "down_proj.weight"])

    def route(self, x, p):
        s, W, mut = self.s, self.W, self.mut
        E, k = s["n_routed_experts"], s["num_experts_per_tok"]
        G, kg = s["n_group"], s["topk_group"]
        z = F.linear(x, W[p + "gate.weight"])  # router in >= fp32
        if s["scoring_func"] == "softmax":
            prob = z.softmax(-1)
            choice = prob
        else:
            prob = z.sigmoid()
            bias = W[p + "gate.e_score_correction_bias"]
            choice = prob if "ignore_bias" in mut else prob + bias
        method = s["topk_method"]
        # Decision margins are measured in "score units" whose f32 error is easy to bound: the router
        # logit z for softmax (softmax is monotone in z, so ranking p == ranking z), sigma' for sigmoid.
        unit = z if s["scoring_func"] == "softmax" else choice
        T = x.shape[0]
        gap = torch.full((T,), float("inf"), dtype=self.dt)
        if method in ("group_limited_greedy", "noaux_tc") and "no_group_limit" not in mut:
            grouped = choice.view(-1, G, E // G)
            top2sum = grouped.topk(2, -1).values.sum(-1)
            gmax = grouped.max(-1).values
            gscore = top2sum if method == "noaux_tc" else gmax
            if "group_score_swapped" in mut:
                gscore = gmax if method == "noaux_tc" else top2sum
            gidx = gscore.topk(kg, -1).indices
            gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gidx, True)
            emask = gmask[:, :, None].expand(-1, G, E // G).reshape(-1, E)
            masked = choice.masked_fill(~emask, float("-inf"))
            masked0 = choice.masked_fill(~emask, 0.0)  # HF V2 fills 0.0: must select the same experts
            idx0 = masked0.topk(k, -1).indices.sort(-1).values
            ug = unit.view(-1, G, E // G)
            ugs = (ug.topk(2, -1).values.sum(-1) if method == "noaux_tc" else ug.max(-1).values)
            ugs = ugs.sort(-1, descending=True).values
            gap = torch.minimum(gap, ugs[:, kg - 1] - ugs[:, kg])
            unit_allowed = unit.masked_fill(~emask, float("-inf"))
        else:
            masked = choice
            idx0 = None
            unit_allowed = unit
        idx = masked.topk(k, -1).indices
        if E > k:
            ut = unit_allowed.topk(k + 1, -1).values
            g2 = ut[:, k - 1] - ut[:, k]
            gap = torch.minimum(gap, torch.where(torch.isfinite(ut[:, k]), g2, torch.full_like(g2, float("inf"))))
        self.trace.append(dict(unit=unit.detach().clone(), gap=gap))
        if idx0 is not None and not torch.equal(idx0, idx.sort(-1).values):
            self.mask_fill_mismatch += 1
        if s["scoring_func"] == "softmax":
            w = prob.gather(1, idx)
            if "v2_renormalize" in mut:
                w = w / w.sum(-1, keepdim=True)
        else:
            w = (choice if "weights_from_biased" in mut else prob).gather(1, idx)
            if s["norm_topk_prob"]:
                w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * s["routed_scaling_factor"]
        dense = torch.zeros(x.shape[0], E, dtype=self.dt).scatter_(1, idx, w)
        return dense

    def moe(self, x, p):
        weights = self.route(x, p)[:, :, None]
        E = self.s["n_routed_experts"]
        y = torch.zeros_like(x)
        for e in range(E):
            we = weights[:, e]
            sel = we[:, 0] != 0
            if sel.any():
                y[sel] += we[sel] * self.mlp(x[sel], p + f"experts.{e}.")
        shared = self.mlp(x, p + "shared_experts.")
        if "shared_expert_scaled" in self.mut:
            shared = shared * self.s["routed_scaling_factor"]
        return y + shared

    def attention(self, x, p, pos, cache):
        W, nh, dn, dr, dv = self.W, self.nh, self.dn, self.dr, self.dv
        T = x.shape[0]
        if self.s["q_lora_rank"] is None:
            q = F.linear(x, W[p + "q_proj.weight"])
        else:
            cq = self.rms(F.linear(x, W[p + "q_a_proj.weight"]), W[p + "q_a_layernorm.weight"])
            q = F.linear(cq, W[p + "q_b_proj.weight"])
        q = q.view(T, nh, dn + dr).transpose(0, 1)           # [nh, T, d_qk], head-major [nope | rope]
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        a = F.linear(x, W[p + "kv_a_proj_with_mqa.weight"])
        rkv = self.s["kv_lora_rank"]
        c_kv = self.rms(a[:, :rkv], W[p + "kv_a_layernorm.weight"])
        k_pe = self.rope(a[:, rkv:], pos)                      # [T, d_r] shared by all heads
        q_pe = self.rope(q_pe, pos)
        kv = F.linear(c_kv, W[p + "kv_b_proj.weight"]).view(T, nh, dn + dv).transpose(0, 1)
        k = torch.cat([kv[..., :dn], k_pe[None].expand(nh, T, dr)], -1)
        v = kv[..., dn:]
        qf = torch.cat([q_nope, q_pe], -1)
        if cache.get(p) is not None:
            k = torch.cat([cache[p][0], k], 1)
            v = torch.cat([cache[p][1], v], 1)
            kpos = torch.cat([cache[p][2], pos])
        else:
            kpos = pos
        cache[p] = (k, v, kpos)
        S = k.shape[1]
        scores = (qf @ k.transpose(1, 2)) * self.tau
        # causal by sequence index (cache order), not by the (possibly mutated) position value
        qi = torch.arange(S - T, S)[:, None]
        ki = torch.arange(S)[None, :]
        scores = scores.masked_fill(ki > qi, float("-inf"))
        o = scores.softmax(-1) @ v                             # [nh, T, dv]
        return F.linear(o.transpose(0, 1).reshape(T, nh * dv), W[p + "o_proj.weight"])

    def forward(self, ids, pos, cache):
        W = self.W
        h = W["model.embed_tokens.weight"][ids]
        for i in range(self.s["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = h + self.attention(self.rms(h, W[p + "input_layernorm.weight"]), p + "self_attn.", pos, cache)
            x = self.rms(h, W[p + "post_attention_layernorm.weight"])
            h = h + (self.moe(x, p + "mlp.") if layer_is_moe(self.s, i) else self.mlp(x, p + "mlp."))
        h = self.rms(h, W["model.norm.weight"])
        return F.linear(h, W["lm_head.weight"])

    def greedy(self, ids, n, tok_size):
        cache = {}
        pos = torch.arange(len(ids))
        logits = self.forward(torch.tensor(ids), pos, cache)[-1]
        out, all_logits = [], []
        for step in range(n):
            all_logits.append(logits)
            lim = CONFIG_VOCAB if "no_vocab_mask" in self.mut else tok_size
            t = int(logits[:lim].argmax())
            out.append(t)
            if step == n - 1:
                break
            p = len(ids) + step + (1 if "decode_pos_off_by_one" in self.mut else 0)
            logits = self.forward(torch.tensor([t]), torch.tensor([p]), cache)[-1]
        return out, all_logits


# --------------------------------------------------------------------------------------------
# transformers model on the stored weights
# --------------------------------------------------------------------------------------------
def hf_state_dict(spec, W: dict) -> dict:
    """Map checkpoint names (per-expert 2-D) to transformers 5 names (fused 3-D experts)."""
    sd, L, E = {}, spec["num_hidden_layers"], spec["n_routed_experts"]
    for k, v in W.items():
        if k.startswith("model.layers."):
            li = int(k.split(".")[2])
            if li >= L:
                continue  # MTP layer: not part of the HF model
            if ".mlp.experts." in k:
                continue
        sd[k] = v
    for i in range(L):
        if not layer_is_moe(spec, i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        sd[p + "gate_up_proj"] = torch.stack(
            [torch.cat([W[p + f"{e}.gate_proj.weight"], W[p + f"{e}.up_proj.weight"]], 0) for e in range(E)])
        sd[p + "down_proj"] = torch.stack([W[p + f"{e}.down_proj.weight"] for e in range(E)])
    return sd


def build_hf(folder: Path, spec, W32: dict):
    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are handed over already dequantized
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    cls = DeepseekV3ForCausalLM if spec["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
    torch.manual_seed(0)
    model = cls(config).to(torch.float32).eval()
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    res = model.load_state_dict(hf_state_dict(spec, W32), strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res
    # --- spec conformance of this transformers version (design doc §4/§5) ---
    y = yarn_params(spec)
    for layer in model.model.layers:
        hf_tau = layer.self_attn.scaling
        if abs(hf_tau - y["tau"]) > 1e-9 * y["tau"]:
            # Older transformers (before PR #47435) omitted mscale(s, mscale_all_dim)^2 for V2:
            # patch the module so the reference follows the spec.
            print(f"  PATCH: {spec['model_type']} attention scaling {hf_tau} -> spec {y['tau']}")
            layer.self_attn.scaling = y["tau"]
    rot = model.model.rotary_emb
    assert abs(rot.attention_scaling - y["attn_factor"]) < 1e-12, (rot.attention_scaling, y["attn_factor"])
    assert torch.allclose(rot.inv_freq, torch.tensor(y["inv_freq"], dtype=torch.float32), rtol=1e-6, atol=0), \
        (rot.inv_freq, y["inv_freq"])
    if spec["model_type"] == "deepseek_v3":
        assert model.config.rope_interleave is True
    return model


@torch.no_grad()
def hf_greedy(model, ids, n, tok_size):
    seq = list(ids)
    out, all_logits = [], []
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        all_logits.append(logits)
        t = int(logits[:tok_size].argmax())
        out.append(t)
        seq.append(t)
    return out, all_logits


def margin(logits, tok_size):
    top = logits[:tok_size].topk(2).values
    return float(top[0] - top[1])


def f32_list(t: torch.Tensor):
    return [float(str(np.float32(v))) for v in t.tolist()]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------
LONG_TEXT = (
    "Once upon a time there was a little village near the river. Every morning the old man feeds the birds "
    "in the square, and the children laughed when the dog tried to catch its own tail. The history of the city "
    "goes back more than a thousand years: in 1204 there were 37 houses, and in 2023 there were 18250 people "
    "living there. The train leaves the station at seven in the evening. A good teacher explains hard ideas "
    "with simple words, so she wrote on the board: two plus two is four, and 1234 + 567 = 1801. Attention "
    "layers compare each token with the tokens before it. The model reads the prompt and then writes the answer one token at a "
    "time. The numbers in the table show the results of the last experiment: 3.14, 2.71 and 1.41. The cat "
    "sat on the mat and then"
)


def make_prompts(tok: Tokenizer, chat_template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    chat_text = env.from_string(chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    prompts = [
        ("long_english", LONG_TEXT),
        ("chinese_mixed", "今天天气很好，我们去公园散步吧。中国的首都是北京。The weather is nice today"),
        ("chat_r1", chat_text),
        ("short", "Once"),
    ]
    out = []
    for name, text in prompts:
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append(dict(name=name, text=text, input_ids=ids))
    assert len(out[0]["input_ids"]) >= 300, len(out[0]["input_ids"])
    assert 1 <= len(out[3]["input_ids"]) <= 3, out[3]["input_ids"]
    assert out[2]["input_ids"][0] == 0, "chat prompt must start with bos id 0"
    return out


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------
def mutations_for(name, spec):
    """(mutation, required) pairs applicable to a fixture. `required=False` would only report."""
    m = [("rope_neox", True), ("no_mscale2", True), ("tau_absorbed_dim", True),
         ("decode_pos_off_by_one", True), ("no_vocab_mask", True)]
    if spec["topk_method"] in ("group_limited_greedy", "noaux_tc"):
        m += [("no_group_limit", True), ("group_score_swapped", True)]
    if spec["topk_method"] == "noaux_tc":
        m += [("ignore_bias", True), ("weights_from_biased", True)]
    if spec["topk_method"] != "noaux_tc":
        m += [("v2_renormalize", True)]
    if spec["routed_scaling_factor"] != 1.0:
        m += [("shared_expert_scaled", True)]
    if spec["rope"]["mscale"] != spec["rope"]["mscale_all_dim"]:
        m += [("cos_sin_mscale_ignored", True), ("tau_uses_mscale", True)]
    m += [("yarn_off", True), ("yarn_no_truncate", True)]
    if "fp8_block" in spec:
        m += [("fp8_scales_ignored", True), ("fp8_grid_misread", True), ("fp8_block_swapped", True)]
    return m


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def folder_bytes(folder: Path):
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def build_fixture(name, spec, out_root: Path, tok_json: str, tok: Tokenizer, tok_size: int,
                  chat_template: str, prompts, cache_weights: dict, report: dict):
    t0 = time.time()
    folder = out_root / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    block = spec.get("fp8_block")

    # ---- weights as stored ----
    if "base" in spec:
        base_stored = cache_weights[spec["base"]]
        stored = {}
        for k, v in base_stored.items():
            if is_fp8_linear(k) and not k.endswith("eh_proj.weight"):
                w8, s = fp8_quantize(v.to(torch.float32), block)
                stored[k] = w8
                stored[k + "_scale_inv"] = s
            else:
                stored[k] = v
    else:
        stored = to_storage(gen_weights(spec, tok_size), spec["dtype"])
    cache_weights[name] = stored

    write_json(folder / "config.json", hub_config(spec))
    write_json(folder / "generation_config.json", GENERATION_CONFIG)
    (folder / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    write_json(folder / "tokenizer_config.json", tokenizer_config(spec, chat_template))
    save_weights(folder, stored, spec["shards"])

    W32 = stored_to_f32(stored, block)
    model = build_hf(folder, spec, W32)
    ref = RefModel(spec, W32)
    ref64 = RefModel(spec, W32, dtype=torch.float64)
    rt32 = RefModel(spec, W32)  # full-sequence f32 pass, traced against ref64 for routing robustness
    y = yarn_params(spec)
    router_gap, router_err = float("inf"), 0.0

    results, table = [], {}
    base_greedy = {}
    worst_diff, worst_step_diff, worst_d64, min_margin, max_logit = 0.0, 0.0, 0.0, float("inf"), 0.0
    for pr in prompts:
        ids = pr["input_ids"]
        g_hf, lg_hf = hf_greedy(model, ids, N_GREEDY, tok_size)
        with torch.no_grad():
            g_ref, lg_ref = ref.greedy(ids, N_GREEDY, tok_size)
        diff0 = float((lg_hf[0] - lg_ref[0]).abs().max())
        diff = max(float((a - b).abs().max()) for a, b in zip(lg_hf, lg_ref))
        worst_diff = max(worst_diff, diff0)
        worst_step_diff = max(worst_step_diff, diff)
        assert diff0 < LOGIT_TOL_HF_VS_REF, f"{name}/{pr['name']}: HF vs spec reference last logits differ by {diff0}"
        assert diff < LOGIT_TOL_STEPS, f"{name}/{pr['name']}: HF vs spec reference step logits differ by {diff}"
        assert g_hf == g_ref, f"{name}/{pr['name']}: greedy HF {g_hf} != reference {g_ref}"
        # f32 rounding sensitivity: distance of HF's f32 logits from a float64 evaluation of the same model
        seq = ids + g_hf[:-1]
        ref64.trace.clear()
        rt32.trace.clear()
        with torch.no_grad():
            l64 = ref64.forward(torch.tensor(seq), torch.arange(len(seq)), {})[len(ids) - 1:]
            rt32.forward(torch.tensor(seq), torch.arange(len(seq)), {})
        for a, b in zip(rt32.trace, ref64.trace):
            router_err = max(router_err, float((a["unit"].double() - b["unit"]).abs().max()))
            router_gap = min(router_gap, float(b["gap"].min()))
        d64 = float((torch.stack(lg_hf).double() - l64).abs().max())
        worst_d64 = max(worst_d64, d64)
        assert d64 < F64_TOL, f"{name}/{pr['name']}: HF f32 vs float64 logits differ by {d64}"
        margins = [margin(lg, tok_size) for lg in lg_hf]
        mm = min(margins)
        min_margin = min(min_margin, mm)
        assert mm > MIN_GREEDY_MARGIN, f"{name}/{pr['name']}: greedy margin {mm} too small"
        ml = max(float(lg.abs().max()) for lg in lg_hf)
        max_logit = max(max_logit, ml)
        assert ml < MAX_ABS_LOGIT, f"{name}/{pr['name']}: |logit| {ml} too large"
        assert 1 not in g_hf, f"{name}/{pr['name']}: greedy continuation emits eos (a server would stop there)"
        base_greedy[pr["name"]] = g_hf
        results.append(dict(
            name=pr["name"], text=pr["text"], input_ids=ids,
            last_logits=f32_list(lg_hf[0]), greedy=g_hf,
            greedy_text=tok.decode(g_hf, skip_special_tokens=False),
            min_greedy_margin=float(str(np.float32(mm))),
        ))
    assert ref.mask_fill_mismatch == 0 and ref64.mask_fill_mismatch == 0, \
        f"{name}: 0.0-fill group masking selects different experts than -inf"
    # routing decisions must not be near-ties, or an f32 port may legitimately pick another expert
    router_margin = (router_gap, router_err)
    assert router_gap > max(ROUTER_GAP_FACTOR * router_err, MIN_ROUTER_GAP), \
        f"{name}: routing near-tie: fp64 decision gap {router_gap:.3g} vs f32 score error {router_err:.3g}"

    t_ref = time.time()
    # ---- mutation checks ----
    for mut, required in mutations_for(name, spec):
        if mut.startswith("fp8_"):
            Wm = stored_to_f32(stored, block, mode=mut)
            rm = RefModel(spec, Wm)
        else:
            rm = RefModel(spec, W32, mut={mut})
        changed = []
        with torch.no_grad():
            for pr in prompts:
                g, _ = rm.greedy(pr["input_ids"], N_GREEDY, tok_size)
                if g != base_greedy[pr["name"]]:
                    changed.append(pr["name"])
        table[mut] = dict(changed=len(changed), of=len(prompts), required=required, prompts=changed)

    t_mut = time.time()
    # ---- from_pretrained cross-check (validates tensor names / sharding against HF's loader) ----
    fp_check = "skipped (FP8 partial blocks)"
    if block is None:
        cls = DeepseekV3ForCausalLM if spec["model_type"] == "deepseek_v3" else DeepseekV2ForCausalLM
        m2 = cls.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager",
                                 experts_implementation="eager").eval()
        with torch.no_grad():
            for pr, res in zip(prompts, results):
                lg = m2(torch.tensor([pr["input_ids"]])).logits[0, -1]
                d = float((lg - torch.tensor(res["last_logits"])).abs().max())
                assert d < 1e-5, f"{name}: from_pretrained logits differ by {d}"
        fp_check = "ok"
        del m2

    t_fp = time.time()
    ref_json = {
        "fixture": name,
        "generated_by": "tools/make_fixtures.py",
        "reference_impl": f"transformers {transformers.__version__} {spec['arch']}, float32, eager attention, "
                          "CPU, on the stored weights (bf16/f16 upcast to f32, FP8 dequantized)",
        "tokenizer_vocab_size": tok_size,
        "vocab_size": CONFIG_VOCAB,
        "n_greedy": N_GREEDY,
        "greedy_rule": "argmax over ids < tokenizer_vocab_size (padding ids masked); full recompute each step; "
                       "positions 0..len-1",
        "derived": {
            "softmax_scale": y["tau"],
            "rope_cos_sin_factor": y["attn_factor"],
            "yarn_low": y["low"], "yarn_high": y["high"],
            "rope_inv_freq": [float(np.float32(v)) for v in y["inv_freq"]],
        },
        "prompts": results,
    }
    if block is not None:
        ref_json["derived"]["fp8_weight_block_size"] = list(block)
    write_json(folder / "reference.json", ref_json, indent=1)
    size = folder_bytes(folder)
    assert size < MAX_FOLDER_BYTES, f"{name}: folder is {size} bytes"
    report[name] = dict(size=size, worst_diff=worst_diff, worst_step_diff=worst_step_diff, worst_d64=worst_d64, min_margin=min_margin, max_logit=max_logit,
                        router_margin=router_margin, table=table, yarn=y, from_pretrained=fp_check,
                        seconds=time.time() - t0,
                        timing=f"setup+reference {t_ref - t0:.0f}s, mutations {t_mut - t_ref:.0f}s, "
                               f"from_pretrained {t_fp - t_mut:.0f}s",
                        prompt_lens=[len(p["input_ids"]) for p in prompts])


def find_chat_template() -> str:
    for p in CHAT_TEMPLATE_CANDIDATES:
        if p.exists():
            return p.read_text(encoding="utf-8")
    raise SystemExit("deepseek-r1.jinja not found (shared/testdata/chat-templates/)")


def generate(out_root: Path) -> dict:
    t0 = time.time()
    tok_json = train_tokenizer()
    tok_json2 = train_tokenizer()
    assert tok_json == tok_json2, "tokenizer training is not deterministic"
    tok = Tokenizer.from_str(tok_json)
    tok_size = tok.get_vocab_size(with_added_tokens=True)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1 and tok.token_to_id(PAD) == 2
    assert tok_size < CONFIG_VOCAB
    chat_template = find_chat_template()
    prompts = make_prompts(tok, chat_template)
    print(f"tokenizer: {tok_size} ids (config vocab_size {CONFIG_VOCAB}); prompt lengths "
          f"{[len(p['input_ids']) for p in prompts]}; {time.time() - t0:.1f}s")
    out_root.mkdir(parents=True, exist_ok=True)
    report, cache_weights = {}, {}
    for name, spec in SPECS.items():
        build_fixture(name, spec, out_root, tok_json, tok, tok_size, chat_template, prompts, cache_weights, report)
        r = report[name]
        print(f"[{name}] {r['size']} bytes, HF-vs-ref max|dlogit| {r['worst_diff']:.2e} (all steps "
              f"{r['worst_step_diff']:.2e}; HF vs fp64 "
              f"{r['worst_d64']:.2e}), min greedy margin "
              f"{r['min_margin']:.4f}, max|logit| {r['max_logit']:.1f}, router gap/err {r['router_margin'][0]:.2e}/{r['router_margin'][1]:.1e}, "
              f"from_pretrained {r['from_pretrained']}, {r['seconds']:.1f}s ({r['timing']})")
    # Tokenizer cross-check through transformers' AutoTokenizer (tokenizer_config + chat template).
    from transformers import AutoTokenizer
    at = AutoTokenizer.from_pretrained(str(out_root / "v3"))
    for p in prompts:
        assert at.encode(p["text"], add_special_tokens=False) == p["input_ids"], p["name"]
    rendered = at.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      tokenize=False, add_generation_prompt=True)
    assert rendered == prompts[2]["text"], (rendered, prompts[2]["text"])
    return report


def print_table(report) -> bool:
    names = list(report)
    muts = []
    for n in names:
        for m in report[n]["table"]:
            if m not in muts:
                muts.append(m)
    ok = True
    w = max(len(m) for m in muts) + 2
    print("\nmutation".ljust(w + 1) + "".join(n.rjust(12) for n in names))
    for m in muts:
        row = m.ljust(w)
        for n in names:
            e = report[n]["table"].get(m)
            if e is None:
                cell = "-"
            else:
                cell = f"{e['changed']}/{e['of']}" + ("" if e["required"] else "(i)")
                if e["required"] and e["changed"] == 0:
                    cell = "FAIL"
                    ok = False
            row += cell.rjust(12)
        print(row)
    print("(n/4 = prompts whose 32-token greedy output changed; (i) = informational, not required)")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=FIXTURES, help="output root (default tests/fixtures)")
    ap.add_argument("--check", action="store_true",
                    help="generate into a temp dir and compare byte-for-byte with --out")
    args = ap.parse_args()
    t0 = time.time()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    if args.check:
        tmp = Path(tempfile.mkdtemp(prefix="fixtures-"))
        report = generate(tmp)
        ok = print_table(report)
        same = True
        for name in SPECS:
            a, b = tmp / name, args.out / name
            files = sorted({f.name for f in a.iterdir()} | ({f.name for f in b.iterdir()} if b.exists() else set()))
            for f in files:
                if not ((a / f).exists() and (b / f).exists() and filecmp.cmp(a / f, b / f, shallow=False)):
                    print(f"DIFFERS: {name}/{f}")
                    same = False
        shutil.rmtree(tmp)
        print("byte-identical" if same else "NOT byte-identical")
        ok = ok and same
    else:
        report = generate(args.out)
        ok = print_table(report)
    print(f"total {time.time() - t0:.1f}s")
    if not ok:
        print("ERROR: some required mutation did not change any greedy output (or fixtures differ)")
        sys.exit(1)


if __name__ == "__main__":
    main()
