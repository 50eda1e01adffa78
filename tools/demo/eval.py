#!/usr/bin/env python3
"""Evaluate the demo model on the held-out problems, the way the server runs it.

    /work/pyref/bin/python tools/demo/eval.py                          # models/mlaserve-demo, 200 problems
    /work/pyref/bin/python tools/demo/eval.py --model DIR --limit 50 --show 3

Loads model.safetensors (bf16, router bias F32) converted to float32 into transformers'
DeepseekV3ForCausalLM, renders each question with the chat template through
AutoTokenizer.apply_chat_template(add_generation_prompt=True), decodes greedily one problem at a time
(no padding), splits the output at `</think>` and checks that the last integer of the answer equals
the expected answer. Every output must also have non-empty reasoning and answer and end with eos.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


@torch.no_grad()
def greedy(model, ids: list[int], max_new: int, tok_size: int) -> tuple[list[int], float]:
    """Greedy decoding with a KV cache; argmax over real token ids only (padding rows masked).
    Returns the new ids (including eos if produced) and the smallest top1-top2 logit margin."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    inp = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    out, min_margin = [], float("inf")
    for _ in range(max_new):
        logits = model(input_ids=inp, position_ids=pos, past_key_values=cache, use_cache=True).logits[0, -1, :tok_size]
        top = logits.topk(2).values
        min_margin = min(min_margin, float(top[0] - top[1]))
        t = int(logits.argmax())
        out.append(t)
        if t == 1:
            break
        inp = torch.tensor([[t]])
        pos = pos[:, -1:] + 1
    return out, min_margin


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR)
    ap.add_argument("--data", type=Path, default=C.HELDOUT)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--show", type=int, default=0, help="print this many full transcripts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write per-problem results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(str(args.model))
    tok_size = len(tok)
    model = C.load_checkpoint_model(args.model)
    probs = [json.loads(line) for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.limit:
        probs = probs[:args.limit]

    t0 = time.time()
    correct, malformed, fails, results = 0, 0, [], []
    max_len, worst_margin = 0, float("inf")
    for i, p in enumerate(probs):
        ids = tok.apply_chat_template([{"role": "user", "content": p["question"]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        out, margin = greedy(model, list(ids), args.max_new_tokens, tok_size)
        text = tok.decode(out, skip_special_tokens=True)
        parts = C.split_output(text)
        got = C.extract_answer(text)
        well_formed = parts is not None and parts[0] != "" and parts[1] != "" and out[-1] == 1
        ok = got == p["answer"]
        correct += ok
        malformed += not well_formed
        max_len = max(max_len, len(out))
        worst_margin = min(worst_margin, margin)
        results.append(dict(question=p["question"], answer=p["answer"], got=got, ok=ok, well_formed=well_formed,
                            new_tokens=len(out), min_margin=margin, output=text))
        if not ok or not well_formed:
            fails.append(results[-1])
        if i < args.show:
            print(f"--- {p['question']!r}\n<think>\n{text}\n")
        if (i + 1) % 25 == 0:
            print(f"{i + 1}/{len(probs)}: {correct} correct, {time.time() - t0:.0f}s", flush=True)

    for f in fails:
        print(f"FAIL {f['question']!r}: expected {f['answer']}, got {f['got']} (well_formed={f['well_formed']})")
        print("    " + f["output"].replace("\n", "\n    "))
    n = len(probs)
    print(f"accuracy {correct}/{n} = {correct / n:.1%}; malformed outputs {malformed}; "
          f"longest output {max_len} tokens (incl. eos); smallest greedy margin {worst_margin:.3f}; "
          f"{time.time() - t0:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    sys.exit(0 if correct == n and malformed == 0 else 1)


if __name__ == "__main__":
    main()
