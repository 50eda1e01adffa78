#!/usr/bin/env python3
"""Train the mlaserve demo model: a tiny DeepSeek-V3 (MLA + sigmoid/noaux_tc MoE) that answers
arithmetic questions with R1-style reasoning. CPU only, seeded: about 92 minutes on 2 cores
(3,400 steps of the first cycle in 59 min, 2,000 of the second in 33 min).

    /work/pyref/bin/python tools/demo/train.py                 # writes models/mlaserve-demo/
    /work/pyref/bin/python tools/demo/train.py --resume        # continue after a crash

Writes the tokenizer and config files first, then model.safetensors (bf16, router bias F32) every
--save-every steps and at the end. A resume state (model, optimizer, step) is kept in --state.
See tools/demo/README.md.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

# Passive OpenMP waiting: with other processes competing for the 2 cores, spinning worker threads
# make torch 3-4x slower than this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

SEED = 20250607


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Data:
    """Seeded on-the-fly batches. Batch `i` depends only on (SEED, i // chunk): resumable exactly.
    Examples of a chunk are sorted by length and cut into batches to limit padding."""

    def __init__(self, tok: Tokenizer, batch: int, chunk: int = 16):
        self.tok, self.batch, self.chunk = tok, batch, chunk
        self.render = C.PromptRenderer(C.find_chat_template())
        self.cache: dict[int, list] = {}

    def encode(self, ex):
        p = self.tok.encode(self.render(ex["messages"]), add_special_tokens=False).ids
        c = self.tok.encode(C.completion_text(ex["reasoning"], ex["answer"]), add_special_tokens=False).ids + [1]
        return p, c

    def get(self, step: int):
        ci = step // self.chunk
        if ci not in self.cache:
            rng = random.Random(f"{SEED}-chunk-{ci}")
            seqs = [self.encode(C.sample_example(rng)) for _ in range(self.batch * self.chunk)]
            seqs.sort(key=lambda pc: len(pc[0]) + len(pc[1]))
            batches = [seqs[i * self.batch:(i + 1) * self.batch] for i in range(self.chunk)]
            rng.shuffle(batches)
            self.cache = {ci: batches}
        return self.collate(self.cache[ci][step % self.chunk])

    @staticmethod
    def collate(seqs):
        T = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), T), 2, dtype=torch.long)      # <｜▁pad▁｜>, right padding
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, (p, c) in enumerate(seqs):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)     # loss on the assistant part only
        return ids, labels


class BiasBalancer:
    """DeepSeek-V3 auxiliary-loss-free load balancing: after each step,
    e_score_correction_bias += gamma * sign(mean_load - load_e) per MoE layer."""

    def __init__(self, model, gamma: float):
        self.gamma = gamma
        self.routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.loads = [None] * len(self.routers)
        self.token_mask = None
        self.active = True          # off during generation (dev_eval)
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, inputs, output):
            if not self.active:
                return
            idx = output[2].detach()
            if self.token_mask is not None:
                idx = idx[self.token_mask.reshape(-1)]
            self.loads[i] = torch.bincount(idx.reshape(-1), minlength=module.num_experts).float()
        return hook

    @torch.no_grad()
    def update(self):
        imbalance = []
        for r, load in zip(self.routers, self.loads):
            r.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
            imbalance.append(float(load.max() / load.mean()))
        return imbalance


def cosine(step, total, peak, warmup, final_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def lr_at(step, args):
    """Two cosine cycles: the first (--cycle1 steps from --lr down to 5%) learns the task; the second
    (the remaining steps, from --lr2 down to 0) is a warm restart that sharpens copying and borrows,
    where the last errors of the first cycle are."""
    if step < args.cycle1:
        return cosine(step, args.cycle1, args.lr, args.warmup, 0.05)
    return cosine(step - args.cycle1, args.steps - args.cycle1, args.lr2, 50, 0.0)


@torch.no_grad()
def dev_eval(model, tok, render, n=48, seed=4242, max_new=220):
    """Quick greedy check on reserved (never trained) problems; batched with left padding."""
    rng = random.Random(seed)
    probs = []
    for i in range(n):
        op = "+-*"[i % 3]
        a, b = C.sample_operands(rng, op, reserved=True)
        probs.append((C.make_question(rng, op, a, b), C.solve(op, a, b)[2]))
    model.eval()
    ok = 0
    bs = 16
    for s in range(0, n, bs):
        chunk = probs[s:s + bs]
        enc = [tok.encode(render([{"role": "user", "content": q}]), add_special_tokens=False).ids for q, _ in chunk]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), 2, dtype=torch.long)
        att = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, T - len(e):] = torch.tensor(e)
            att[i, T - len(e):] = 1
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=1, pad_token_id=2)
        for (q, want), row in zip(chunk, out[:, T:].tolist()):
            text = tok.decode(row, skip_special_tokens=True)
            if C.extract_answer(text) == want:
                ok += 1
    model.train()
    return ok / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=C.MODEL_DIR)
    ap.add_argument("--state", type=Path, default=Path("/tmp/mlaserve-demo-train/state.pt"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=5400, help="total steps of both cycles")
    ap.add_argument("--cycle1", type=int, default=3400, help="steps of the first cosine cycle")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=4e-4, help="peak learning rate of the second cycle")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--gamma", type=float, default=1e-3, help="bias update speed (aux-loss-free balancing)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=850)
    ap.add_argument("--time-limit", type=float, default=0, help="stop (and save) after this many seconds (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, args {vars(args)}")

    tok_json = C.train_tokenizer()
    assert tok_json == C.train_tokenizer(), "tokenizer training is not deterministic"
    tok = Tokenizer.from_str(tok_json)
    for i, t in enumerate((C.BOS, C.EOS, C.PAD)):
        assert tok.token_to_id(t) == i
    assert tok.get_vocab_size() <= C.CONFIG_VOCAB
    C.write_model_files(args.out, tok_json, C.find_chat_template())
    log(f"tokenizer: {tok.get_vocab_size()} ids; model files in {args.out}")

    model = C.build_hf_model(args.out, experts="grouped_mm")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    balancer = BiasBalancer(model, args.gamma)
    data = Data(tok, args.batch)
    render = data.render

    step = 0
    if args.resume and args.state.exists():
        st = torch.load(args.state, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"resumed at step {step}")
    args.state.parent.mkdir(parents=True, exist_ok=True)

    def save(tag):
        C.save_checkpoint(model, args.out)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, str(args.state) + ".tmp")
        os.replace(str(args.state) + ".tmp", args.state)
        log(f"saved {tag} at step {step}")

    ema, tokens, t_log = None, 0, time.time()
    stopped_early = False
    while step < args.steps:
        if args.time_limit and time.time() - t_start > args.time_limit:
            stopped_early = True
            log(f"time limit reached at step {step}")
            break
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels = data.get(step)
        balancer.token_mask = ids != 2
        # f32: on this CPU, bf16 autocast measured slower (1.9k vs 3.4k tokens/s at batch 32)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        imb = balancer.update()
        step += 1
        tokens += int((ids != 2).sum())
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if step % 20 == 0:
            dt = time.time() - t_log
            log(f"step {step} loss {lv:.4f} ema {ema:.4f} lr {lr:.2e} gnorm {float(gnorm):.2f} "
                f"tok/s {tokens / dt:.0f} load max/mean {' '.join(f'{x:.2f}' for x in imb)} "
                f"elapsed {(time.time() - t_start) / 60:.1f} min")
            tokens, t_log = 0, time.time()
        if step % args.save_every == 0:
            save("checkpoint")
        if args.eval_every and step % args.eval_every == 0:
            t0 = time.time()
            balancer.active = False
            acc = dev_eval(model, tok, render)
            balancer.active = True
            log(f"dev accuracy {acc:.3f} ({time.time() - t0:.0f}s)")
            t_log = time.time()
    save("final" if not stopped_early else "partial (time limit)")
    biases = [r.e_score_correction_bias for r in balancer.routers]
    log(f"e_score_correction_bias: " + "; ".join(" ".join(f"{x:+.3f}" for x in b.tolist()) for b in biases))
    log(f"done: {step} steps, final loss ema {ema:.4f}, wall {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
