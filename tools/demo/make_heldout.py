#!/usr/bin/env python3
"""Write tests/data/demo_heldout.jsonl: 200 seeded arithmetic questions whose operand pairs are
reserved (common.is_reserved), so training never sees them, in either operand order.

    /work/pyref/bin/python tools/demo/make_heldout.py [--out PATH] [--check]

Each line: {"question": "...", "answer": <int>}. 70 additions, 70 subtractions (about half with a
negative result), 60 multiplications; the question templates are cycled so every phrasing appears.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SEED = 777
COUNTS = {"+": 70, "-": 70, "*": 60}


def heldout_lines() -> list[str]:
    rng = random.Random(SEED)
    items, seen = [], set()
    for op, n in COUNTS.items():
        templates = C.TEMPLATES[op]
        order = list(range(len(templates)))
        rng.shuffle(order)
        k = 0
        while k < n:
            a, b = C.sample_operands(rng, op, reserved=True)
            if (op, a, b) in seen:
                continue
            seen.add((op, a, b))
            q = C.make_question(rng, op, a, b, templates[order[k % len(order)]])
            assert C.is_reserved(op, a, b)
            items.append({"question": q, "answer": C.solve(op, a, b)[2]})
            k += 1
    rng.shuffle(items)
    return [json.dumps(it, ensure_ascii=False) for it in items]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.HELDOUT)
    ap.add_argument("--check", action="store_true", help="compare with the existing file instead of writing")
    args = ap.parse_args()
    text = "\n".join(heldout_lines()) + "\n"
    if args.check:
        same = args.out.read_text(encoding="utf-8") == text
        print("identical" if same else "DIFFERS")
        sys.exit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} problems to {args.out}")


if __name__ == "__main__":
    main()
