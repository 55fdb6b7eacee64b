"""Train a small classifier on a synthetic long-range task with any `.attn` pattern (no downloads).

The task ("far majority"): a sequence of N random noise tokens holds MARKS marker tokens, each an A or a
B, all in the second half of the sequence. The label is the majority marker. The model reads its answer
from token 0 only (a CLS token), so the pattern must carry information from far away to position 0: full
attention, global tokens or linear attention can; a sliding window alone cannot within a few layers (its
reach is layers x window), and stays at chance (50%). Under a causal pattern token 0 sees only itself, so
the model reads the sequence reversed: CLS last (it may see every token), the markers in the first half.

    python examples/train_long_range.py                                  # longformer, window 32, 2 CPU-minutes
    python examples/train_long_range.py sliding_window --set window=16   # no global token: stays near chance
    python examples/train_long_range.py examples/longformer_performer_heads.attn --heads 8 --set num_heads=8
    python examples/train_long_range.py performer --device cuda --seq-len 4096 --steps 2000

Prints the loss, accuracy and milliseconds per step as it trains, then the accuracy on held-out data.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import patterndsl as pd
from patterndsl.cli.options import parse_sets

NOISE, MARKS = 16, 5           # token ids: 0 = CLS, 1..NOISE noise, then the markers A and B
VOCAB = 1 + NOISE + 2


def far_majority_batch(batch: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens `[batch, n]` (token 0 is CLS, MARKS markers in the second half) and labels `[batch]` (1 = more
    B markers than A markers)."""
    tokens = torch.randint(1, 1 + NOISE, (batch, n), generator=generator)
    tokens[:, 0] = 0
    half = n // 2
    where = torch.rand(batch, n - half, generator=generator).argsort(dim=1)[:, :MARKS] + half
    kinds = torch.randint(0, 2, (batch, MARKS), generator=generator)
    tokens.scatter_(1, where, 1 + NOISE + kinds)
    return tokens, (kinds.sum(dim=1) > MARKS // 2).long()


class Block(nn.Module):
    """Pre-LN transformer block whose attention is a patterndsl layer."""

    def __init__(self, program, dim: int, heads: int, params: dict):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = pd.nn.Attention(program, dim, heads, **params)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, inputs):
        y = self.attn(self.norm1(x), **inputs)
        x = x + (y[0] if isinstance(y, tuple) else y)
        return x + self.mlp(self.norm2(x))


class Classifier(nn.Module):
    def __init__(self, program, n: int, dim: int, heads: int, layers: int, params: dict):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(program, dim, heads, params) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2))
        self.reversed = is_causal(self.blocks[0].attn)

    def forward(self, tokens):
        if self.reversed:      # causal: CLS goes last (the only token that may see everything), markers first
            tokens = tokens.flip(1)
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        inputs = runtime_inputs(self.blocks[0].attn, tokens)
        for blk in self.blocks:
            x = blk(x, inputs)
        return self.head(x[:, -1] if self.reversed else x[:, 0])


def is_causal(layer) -> bool:
    """True when no query sees a later key: token 0 then sees only itself and cannot hold the answer."""
    ids = runtime_inputs(layer, torch.zeros(1, 8, dtype=torch.long))
    return not bool(layer.op.mask(8, runtime=ids).triu(1).any())


def runtime_inputs(layer, tokens) -> dict:
    """Ids for `same(...)` masks: the whole sequence is one document here."""
    names = layer.op.input_names() if hasattr(layer, "op") else ()
    ids = torch.zeros_like(tokens)
    return {name: ids for name in names if name not in dict(layer.op.ir.params)}


def accuracy(model, tokens, labels, batch: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for s in range(0, len(tokens), batch):
            right += (model(tokens[s:s + batch]).argmax(-1) == labels[s:s + batch]).sum().item()
    model.train()
    return right / len(tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", nargs="?", default="longformer", help="a .attn file or built-in (default: longformer)")
    ap.add_argument("--set", dest="sets", action="append", default=None, metavar="NAME=VALUE",
                    help="pattern parameter (default for longformer: window=32)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (default: 32)")
    ap.add_argument("--dim", type=int, default=64, help="model width (default: 64)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default: 2)")
    ap.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    ap.add_argument("--test-size", type=int, default=512, help="held-out sequences (default: 512)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.seq_len < 2 * MARKS or args.steps < 1 or args.batch < 1:
        print(f"error: need --seq-len >= {2 * MARKS}, --steps >= 1 and --batch >= 1", file=sys.stderr)
        return 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda, but this machine has no CUDA GPU", file=sys.stderr)
        return 1
    try:
        sets = args.sets if args.sets is not None else (["window=32"] if args.pattern == "longformer" else [])
        params = parse_sets(sets)
        program = pd.api.resolve(args.pattern)
        torch.manual_seed(args.seed)
        model = Classifier(program, args.seq_len, args.dim, args.heads, args.layers, params).to(args.device)
    except pd.PatternError as e:
        print(e, file=sys.stderr)
        return 1
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    data = torch.Generator().manual_seed(args.seed + 1)
    test_x, test_y = far_majority_batch(args.test_size, args.seq_len, torch.Generator().manual_seed(10_000 + args.seed))
    test_x, test_y = test_x.to(args.device), test_y.to(args.device)
    print(f"far-majority task: N={args.seq_len}, pattern {program.name} {params or ''}, {args.layers} layers, "
          f"dim {args.dim}, {args.heads} heads, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{args.device}")
    every = max(1, args.steps // 8)
    seen = right = 0
    loss_sum, elapsed = 0.0, 0.0
    for step in range(1, args.steps + 1):
        x, y = far_majority_batch(args.batch, args.seq_len, data)
        x, y = x.to(args.device), y.to(args.device)
        t0 = time.perf_counter()
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        loss_sum += loss.item()
        right += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
        if step % every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss_sum / (seen / args.batch):.3f}  train acc {right / seen:.3f}  "
                  f"{1e3 * elapsed / step:.1f} ms/step", flush=True)
            seen = right = 0
            loss_sum = 0.0
    acc = accuracy(model, test_x, test_y, args.batch)
    print(f"test accuracy {acc:.3f} on {args.test_size} held-out sequences (chance 0.5); "
          f"{1e3 * elapsed / max(1, args.steps):.1f} ms per training step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
