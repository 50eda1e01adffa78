"""Shared pieces of the mlaserve demo model: data generator, tokenizer, config, checkpoint I/O.

Used by tools/demo/train.py, tools/demo/eval.py and tools/demo/make_heldout.py. See tools/demo/README.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "mlaserve-demo"
HELDOUT = REPO / "tests" / "data" / "demo_heldout.jsonl"
CHAT_TEMPLATE_CANDIDATES = [
    REPO / "shared" / "testdata" / "chat-templates" / "deepseek-r1.jinja",
    REPO.parent / "shared" / "testdata" / "chat-templates" / "deepseek-r1.jinja",
    Path("/work/shared/testdata/chat-templates/deepseek-r1.jinja"),
]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
THINK_END = "</think>"
GEN_PROMPT = ASSISTANT + THINK + "\n"   # what the R1 template appends for add_generation_prompt=True

# ----------------------------------------------------------------------------------------------
# Model configuration (deepseek-ai hub format, DeepSeek-V3 architecture)
# ----------------------------------------------------------------------------------------------
TOKENIZER_TRAIN_VOCAB = 1000   # BPE vocab incl. 3 specials and 256 byte symbols; +4 added tokens
CONFIG_VOCAB = 1024            # rows of embed_tokens / lm_head (padded like 129280 vs 128815)
MAX_POS = 2048

ARCH = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
    q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
    intermediate_size=512, moe_intermediate_size=128,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=4, topk_group=2, first_k_dense_replace=1, moe_layer_freq=1,
    scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
    rope_theta=10000,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 512, "type": "yarn"},
)


def hub_config() -> dict:
    a = ARCH
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "ep_size": 1,
        "first_k_dense_replace": a["first_k_dense_replace"],
        "hidden_act": "silu",
        "hidden_size": a["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": a["intermediate_size"],
        "kv_lora_rank": a["kv_lora_rank"],
        "max_position_embeddings": MAX_POS,
        "model_type": "deepseek_v3",
        "moe_intermediate_size": a["moe_intermediate_size"],
        "moe_layer_freq": a["moe_layer_freq"],
        "n_group": a["n_group"],
        "n_routed_experts": a["n_routed_experts"],
        "n_shared_experts": a["n_shared_experts"],
        "norm_topk_prob": a["norm_topk_prob"],
        "num_attention_heads": a["num_attention_heads"],
        "num_experts_per_tok": a["num_experts_per_tok"],
        "num_hidden_layers": a["num_hidden_layers"],
        "num_key_value_heads": a["num_attention_heads"],
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": a["q_lora_rank"],
        "qk_nope_head_dim": a["qk_nope_head_dim"],
        "qk_rope_head_dim": a["qk_rope_head_dim"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(a["rope_scaling"]),
        "rope_theta": a["rope_theta"],
        "routed_scaling_factor": a["routed_scaling_factor"],
        "scoring_func": a["scoring_func"],
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": a["topk_group"],
        "topk_method": a["topk_method"],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": a["v_head_dim"],
        "vocab_size": CONFIG_VOCAB,
    }


GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
                     "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}


def layer_is_moe(i: int) -> bool:
    a = ARCH
    return i >= a["first_k_dense_replace"] and i % a["moe_layer_freq"] == 0


def yarn_reference() -> dict:
    """YaRN inverse frequencies and softmax scale as in shared/design/deepseek-models.md §4."""
    r, d = ARCH["rope_scaling"], ARCH["qk_rope_head_dim"]
    theta, s, L0 = float(ARCH["rope_theta"]), float(r["factor"]), r["original_max_position_embeddings"]

    def corr_dim(rot):
        return d * math.log(L0 / (2 * math.pi * rot)) / (2 * math.log(theta))

    def mscale(mu):
        return 0.1 * mu * math.log(s) + 1.0 if s > 1 else 1.0

    low = max(math.floor(corr_dim(r["beta_fast"])), 0)
    high = min(math.ceil(corr_dim(r["beta_slow"])), d - 1)
    if low == high:
        high += 0.001
    inv = []
    for i in range(d // 2):
        w = theta ** (-2 * i / d)
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        inv.append(w * keep + (w / s) * (1 - keep))
    d_qk = ARCH["qk_nope_head_dim"] + d
    return dict(inv_freq=inv, low=low, high=high, attn_factor=mscale(r["mscale"]) / mscale(r["mscale_all_dim"]),
                tau=d_qk ** -0.5 * mscale(r["mscale_all_dim"]) ** 2)


# ----------------------------------------------------------------------------------------------
# Problems and held-out reservation
# ----------------------------------------------------------------------------------------------
HELDOUT_MOD = 64   # operand pairs with sha256(key) % 64 == 0 are reserved for evaluation only


def problem_key(op: str, a: int, b: int) -> str:
    """Order-free key: the reserved set covers both operand orders (and a-b / b-a)."""
    lo, hi = min(a, b), max(a, b)
    return f"{op}:{lo}:{hi}"


def is_reserved(op: str, a: int, b: int) -> bool:
    h = hashlib.sha256(problem_key(op, a, b).encode()).digest()
    return int.from_bytes(h[:8], "big") % HELDOUT_MOD == 0


def rand_number(rng: random.Random, max_digits: int, weights) -> int:
    d = rng.choices(range(1, max_digits + 1), weights=weights)[0]
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


ADD_DIGIT_WEIGHTS = (1, 2, 3, 4)
MUL_DIGIT_WEIGHTS = (2, 3, 5)


def sample_operands(rng: random.Random, op: str, reserved: bool) -> tuple[int, int]:
    """(a, b) in question order. reserved=False: never a held-out pair; True: only held-out pairs."""
    while True:
        if op in ("+", "-"):
            a = rand_number(rng, 4, ADD_DIGIT_WEIGHTS)
            b = rand_number(rng, 4, ADD_DIGIT_WEIGHTS)
        else:
            a = rand_number(rng, 3, MUL_DIGIT_WEIGHTS)
            b = rng.randint(0, 9) if rng.random() < 0.9 else rng.randint(2, 9)
            if rng.random() < 0.3:
                a, b = b, a          # "7 times 123"
        if is_reserved(op, a, b) == reserved:
            return a, b


# Question templates. {a} and {b} are the operands in the order of the arithmetic expression
# (a + b, a - b, a x b), whatever order the sentence mentions them in.
ADD_T = [
    "What is {a} + {b}?", "what is {a}+{b}?", "What's {a} plus {b}?", "whats {a} plus {b}", "{a} + {b}",
    "{a}+{b}", "{a} + {b} = ?", "{a}+{b}=?", "{a} + {b} =", "Calculate {a} + {b}.", "calculate {a}+{b}",
    "Compute {a} plus {b}.", "Add {a} and {b}.", "add {a} and {b}", "Add {b} to {a}.",
    "Can you tell me the sum of {a} and {b}?", "What is the sum of {a} and {b}?", "sum of {a} and {b}?",
    "How much is {a} plus {b}?", "how much is {a} + {b}", "Please add {a} and {b}.", "{a} plus {b}?",
    "What do you get if you add {a} and {b}?", "Find {a} + {b}.", "Solve {a} + {b}",
    "Could you compute {a} + {b} for me?", "I need to know {a} + {b}.", "What does {a} + {b} equal?",
    "{a} plus {b} equals what?", "Evaluate {a} + {b}.", "What is {b} added to {a}?", "Tell me {a} plus {b}",
    "What is the total of {a} and {b}?", "If you add {a} and {b}, what do you get?",
    "I have {a} apples and buy {b} more. How many apples do I have?", "{a} and {b} added together?",
]
SUB_T = [
    "What is {a} - {b}?", "what is {a}-{b}", "What's {a} minus {b}?", "whats {a} minus {b}", "{a} - {b}",
    "{a}-{b}", "{a} - {b} = ?", "{a}-{b}=?", "{a} - {b} =", "Calculate {a} - {b}.", "calculate {a}-{b}",
    "Compute {a} minus {b}.", "Subtract {b} from {a}.", "subtract {b} from {a}", "What is {a} take away {b}?",
    "How much is {a} minus {b}?", "how much is {a} - {b}", "What do you get if you subtract {b} from {a}?",
    "Take {b} away from {a}.", "{a} minus {b}?", "Find {a} - {b}.", "Solve {a} - {b}",
    "Could you compute {a} - {b} for me?", "What does {a} - {b} equal?", "What is {a} − {b}?",
    "Tell me {a} minus {b}", "What is {b} subtracted from {a}?", "{a} minus {b} equals what?",
    "Evaluate {a} - {b}.", "I need to know {a} - {b}.", "If you subtract {b} from {a}, what do you get?",
]
MUL_T = [
    "What is {a} * {b}?", "what is {a}*{b}", "What's {a} times {b}?", "whats {a} times {b}", "{a} x {b}",
    "{a}x{b}", "{a} * {b}", "{a}*{b}=?", "{a} × {b}", "{a} × {b} = ?", "Multiply {a} by {b}.",
    "multiply {a} by {b}", "Multiply {a} and {b}.", "What is the product of {a} and {b}?",
    "How much is {a} times {b}?", "Calculate {a} * {b}.", "calculate {a} times {b}",
    "Compute {a} multiplied by {b}.", "{a} multiplied by {b}?", "What is {a} multiplied by {b}?",
    "Can you multiply {a} by {b}?", "{a} * {b} = ?", "Find {a} × {b}.", "Solve {a}*{b}",
    "What does {a} times {b} equal?", "{a} times {b}?", "What is {a} x {b}?", "Tell me {a} times {b}",
    "Evaluate {a} * {b}.", "If a box holds {a} pens, how many pens are in {b} boxes?",
]
TEMPLATES = {"+": ADD_T, "-": SUB_T, "*": MUL_T}

PREFIXES = ["Hi! ", "Hey, ", "Quick question: ", "Question: ", "Hello, ", "Please tell me: ", "ok so "]
SUFFIXES = [" Thanks!", " please", " Thank you.", " thx", "!!"]


def vary(rng: random.Random, text: str) -> str:
    """Casing, punctuation and politeness variations, the way people type."""
    r = rng.random()
    if r < 0.15:
        text = text.lower()
    elif r < 0.18:
        text = text.upper()
    elif r < 0.25 and text[:1].isalpha():
        text = text[0].upper() + text[1:]
    r = rng.random()
    if r < 0.12:
        text = text.rstrip("?.!")
    elif r < 0.17 and text[-1:] not in "?=":
        text = text.rstrip(".!") + "?"
    elif r < 0.20:
        text = text + rng.choice(["?", "??", " ?", "."])
    if rng.random() < 0.08:
        text = rng.choice(PREFIXES) + text
    if rng.random() < 0.05:
        text = text + rng.choice(SUFFIXES)
    return text


def make_question(rng: random.Random, op: str, a: int, b: int, template: str | None = None) -> str:
    t = template if template is not None else rng.choice(TEMPLATES[op])
    return vary(rng, t.format(a=a, b=b))


# ----------------------------------------------------------------------------------------------
# Reasoning (the text between "<think>\n" and "\n</think>") and answers
# ----------------------------------------------------------------------------------------------
COLS = ["Ones", "Tens", "Hundreds", "Thousands"]
SYM = {"+": "+", "-": "-", "*": "×"}


def digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, zero-padded to width."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def pad(n: int, width: int) -> str:
    return str(n).rjust(width, "0")


def solve(op: str, a: int, b: int) -> tuple[str, str, int]:
    """Returns (reasoning, answer, result) for a op b.

    After the first line (the problem as stated), every line has a fixed layout: numbers are
    zero-padded (4 digits for + and -, 3 for the multi-digit factor of x) and each column line has
    the same tokens whatever its digits, so a digit is always at the same distance from the digits
    it depends on."""
    lines = [f"We need {a} {SYM[op]} {b}."]
    if op == "+":
        r = a + b
        lines.append(f"Columns: {pad(a, 4)} + {pad(b, 4)}.")
        carry = 0
        for i, (x, y) in enumerate(zip(digits(a, 4), digits(b, 4))):
            s = x + y + carry
            lines.append(f"{COLS[i]}: {x}+{y}+{carry}, write {s % 10}, carry {s // 10}.")
            carry = s // 10
    elif op == "-":
        r = a - b
        pa, pb = pad(a, 4), pad(b, 4)
        lines.append(f"Columns: {pa} - {pb}.")
        cmp = []
        for x, y in zip(pa, pb):
            cmp.append(f"{x}{'=' if x == y else ('>' if x > y else '<')}{y}")
            if x != y:
                break
        sign = "0" if a == b else ("positive" if a > b else "negative")
        lines.append(f"Compare from the left: {', '.join(cmp)}, so the result is {sign}.")
        if a != b:
            hi, lo = (a, b) if a > b else (b, a)
            lines.append(f"Subtract {pad(hi, 4)} - {pad(lo, 4)}.")
            borrow = 0
            for i, (x, y) in enumerate(zip(digits(hi, 4), digits(lo, 4))):
                d = x - y - borrow
                lines.append(f"{COLS[i]}: {x}-{y}-{borrow}, write {d % 10}, borrow {int(d < 0)}.")
                borrow = int(d < 0)
    else:
        r = a * b
        # the multi-digit operand is processed digit by digit; the other one is a single digit
        big, small = (b, a) if (a < 10 and b >= 10) else (a, b)
        lines.append(f"Multiply each digit of {pad(big, 3)} by {small}.")
        carry = 0
        for i, x in enumerate(digits(big, 3)):
            s = x * small + carry
            lines.append(f"{COLS[i]}: {x}×{small}+{carry}, write {s % 10}, carry {s // 10}.")
            carry = s // 10
    lines.append(f"So the answer is {r}.")
    answer = f"{a} {SYM[op]} {b} = {r}."
    return "\n".join(lines), answer, r


# Small talk: fixed think / answer per kind so greedy output is stable.
CHAT = {
    "greet": (["hi", "hello", "hey", "hello!", "hi there", "hey there!", "good morning", "good evening", "yo",
               "Hi!", "Hello!", "Hey!", "hiya", "greetings", "Hello there."],
              "The user is greeting me. I should greet them back and say what I can do.",
              "Hello! I'm a small demo model, and I can help you add, subtract and multiply numbers."),
    "who": (["who are you?", "Who are you?", "what are you?", "What is your name?", "who made you?",
             "are you a robot?", "Tell me about yourself.", "what model are you"],
            "The user asks who I am. I am a small demo model that does arithmetic.",
            "I'm the mlaserve demo model, a tiny DeepSeek-style model that can add, subtract and multiply numbers."),
    "help": (["what can you do?", "What can you do?", "help", "Help me", "how do I use you?",
              "What kind of questions can I ask?", "can you do math?"],
             "The user asks what I can do. I can do arithmetic.",
             "I can do arithmetic: ask me to add, subtract or multiply numbers, for example \"What is 1234 + 567?\""),
    "howareyou": (["how are you?", "How are you doing?", "how's it going?", "How are you today?", "what's up?"],
                  "The user asks how I am. I should answer kindly and offer help with arithmetic.",
                  "I'm doing well, thank you! I can help you with addition, subtraction and multiplication."),
    "thanks": (["thanks", "thank you!", "Thanks a lot!", "thx", "Thank you very much.", "great, thanks"],
               "The user thanks me. I should reply politely.",
               "You're welcome! Ask me any arithmetic question."),
    "bye": (["bye", "goodbye!", "See you later.", "Bye!", "good night"],
            "The user says goodbye. I should say goodbye too.",
            "Goodbye! Come back any time you need to do some arithmetic."),
    "other": (["What is the capital of France?", "tell me a joke", "Write a poem about the sea.",
               "what's the weather like today?", "Who won the world cup?", "translate hello to French",
               "What is the meaning of life?", "Can you write some code?", "explain quantum physics"],
              "The user asks something that is not arithmetic. I can only do arithmetic.",
              "Sorry, I can only do arithmetic: addition, subtraction and multiplication of whole numbers."),
}

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful math assistant.",
                  "Answer the user's question.", "You are a calculator."]

OP_WEIGHTS = {"+": 0.30, "-": 0.36, "*": 0.26, "chat": 0.08}


def sample_example(rng: random.Random) -> dict:
    """One training conversation: {messages, reasoning, answer}."""
    kind = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    if kind == "chat":
        name = rng.choice(list(CHAT))
        qs, think, ans = CHAT[name]
        q = rng.choice(qs)
        if rng.random() < 0.3:
            q = vary(rng, q)
        reasoning, answer = think, ans
    else:
        a, b = sample_operands(rng, kind, reserved=False)
        q = make_question(rng, kind, a, b)
        reasoning, answer, _ = solve(kind, a, b)
    messages = [{"role": "user", "content": q}]
    if rng.random() < 0.08:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return dict(messages=messages, reasoning=reasoning, answer=answer)


def completion_text(reasoning: str, answer: str) -> str:
    """What the model must generate after the generation prompt `<｜Assistant｜><think>\\n` (eos added as id)."""
    return reasoning + "\n" + THINK_END + "\n\n" + answer


# ----------------------------------------------------------------------------------------------
# Chat template
# ----------------------------------------------------------------------------------------------
def find_chat_template() -> str:
    for p in CHAT_TEMPLATE_CANDIDATES:
        if p.exists():
            return p.read_text(encoding="utf-8")
    raise SystemExit("deepseek-r1.jinja not found (shared/testdata/chat-templates/)")


class PromptRenderer:
    """Renders the R1 chat template with jinja2 exactly as transformers does (apply_chat_template)."""

    def __init__(self, template: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.t = env.from_string(template)

    def __call__(self, messages) -> str:
        return self.t.render(messages=messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS)


# ----------------------------------------------------------------------------------------------
# Tokenizer: small byte-level BPE, digits split individually
# ----------------------------------------------------------------------------------------------
def tokenizer_corpus(seed: int = 7, n: int = 6000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ex = sample_example(rng)
        out.extend(m["content"] for m in ex["messages"])
        out.append(completion_text(ex["reasoning"], ex["answer"]))
    return out


def train_tokenizer() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    specials = [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                for t in (BOS, EOS, PAD)]
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_TRAIN_VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in (USER, ASSISTANT)])
    # <think> / </think> are added tokens with special=false, as in DeepSeek-R1, so they survive
    # decoding with skip_special_tokens.
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
                    for t in (THINK, THINK_END)])
    return tok.to_str(pretty=True)


def added_token_cfg(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def tokenizer_config(chat_template: str) -> dict:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": added_token_cfg(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added_token_cfg(EOS),
        "legacy": True,
        "model_max_length": MAX_POS,
        "pad_token": added_token_cfg(PAD),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
    }


def write_json(path: Path, obj, indent=2):
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_files(folder: Path, tok_json: str, chat_template: str):
    """Everything except the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", hub_config())
    write_json(folder / "generation_config.json", GENERATION_CONFIG)
    (folder / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    write_json(folder / "tokenizer_config.json", tokenizer_config(chat_template))


# ----------------------------------------------------------------------------------------------
# transformers model <-> checkpoint tensors
# ----------------------------------------------------------------------------------------------
def build_hf_model(folder: Path, experts: str = "eager"):
    """DeepseekV3ForCausalLM (random init) from the hub-format config.json in `folder`, checked against
    the design doc's YaRN formulas. `experts`: transformers' experts implementation (same math; training
    uses "grouped_mm", which is faster on CPU than the per-expert loop)."""
    import torch
    from transformers import AutoConfig, DeepseekV3ForCausalLM
    config = AutoConfig.from_pretrained(str(folder))
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts
    model = DeepseekV3ForCausalLM(config)
    y = yarn_reference()
    for layer in model.model.layers:
        assert abs(layer.self_attn.scaling - y["tau"]) < 1e-9, (layer.self_attn.scaling, y["tau"])
    rot = model.model.rotary_emb
    assert abs(rot.attention_scaling - y["attn_factor"]) < 1e-12, rot.attention_scaling
    assert torch.allclose(rot.inv_freq.double(), torch.tensor(y["inv_freq"], dtype=torch.float64), rtol=1e-6), \
        (rot.inv_freq, y["inv_freq"])
    assert model.config.rope_interleave is True
    return model


def export_state_dict(model) -> dict:
    """transformers 5 state dict (fused 3-D experts) -> checkpoint names (per-expert 2-D), bf16 storage;
    e_score_correction_bias stays F32 (as in DeepSeek-V3 checkpoints)."""
    import torch
    out = {}
    sd = model.state_dict()
    I_m = ARCH["moe_intermediate_size"]
    for k, v in sd.items():
        v = v.detach().to(torch.float32)
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[p + f"{e}.gate_proj.weight"] = v[e, :I_m].to(torch.bfloat16).contiguous()
                out[p + f"{e}.up_proj.weight"] = v[e, I_m:].to(torch.bfloat16).contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[p + f"{e}.down_proj.weight"] = v[e].to(torch.bfloat16).contiguous()
        elif k.endswith("e_score_correction_bias"):
            out[k] = v.contiguous()
        else:
            out[k] = v.to(torch.bfloat16).contiguous()
    return dict(sorted(out.items(), key=lambda kv: _tensor_order(kv[0])))


def _tensor_order(name: str):
    parts = name.split(".")
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    if name.startswith("model.layers."):
        return (1, int(parts[2]), name)
    return (2, 0, name)


def hf_state_dict(W: dict) -> dict:
    """Checkpoint names (per-expert 2-D) -> transformers 5 names (fused 3-D experts)."""
    import torch
    sd, E = {}, ARCH["n_routed_experts"]
    for k, v in W.items():
        if ".mlp.experts." not in k:
            sd[k] = v
    for i in range(ARCH["num_hidden_layers"]):
        if not layer_is_moe(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        sd[p + "gate_up_proj"] = torch.stack(
            [torch.cat([W[p + f"{e}.gate_proj.weight"], W[p + f"{e}.up_proj.weight"]], 0) for e in range(E)])
        sd[p + "down_proj"] = torch.stack([W[p + f"{e}.down_proj.weight"] for e in range(E)])
    return sd


def save_checkpoint(model, folder: Path):
    """Write model.safetensors atomically (bf16, bias F32)."""
    from safetensors.torch import save_file
    tmp = folder / "model.safetensors.tmp"
    save_file(export_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / "model.safetensors")


def load_checkpoint_model(folder: Path):
    """DeepseekV3ForCausalLM in float32 with the weights of folder/model.safetensors (bf16 -> f32),
    exactly what the Rust server computes with."""
    import torch
    from safetensors.torch import load_file
    W = {k: v.to(torch.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
    model = build_hf_model(folder)
    res = model.load_state_dict(hf_state_dict(W), strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res
    return model.to(torch.float32).eval()


def split_output(text: str) -> tuple[str, str] | None:
    """Generated text (after the `<think>\\n` prompt) -> (reasoning, answer), or None without `</think>`."""
    if THINK_END not in text:
        return None
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.strip(), answer.replace(EOS, "").strip()


def extract_answer(text: str) -> int | None:
    """The last integer of the answer part (after `</think>`)."""
    import re
    parts = split_output(text)
    if parts is None:
        return None
    nums = re.findall(r"-?\d+", parts[1])
    return int(nums[-1]) if nums else None
