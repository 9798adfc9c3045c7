#!/usr/bin/env python3
"""The encoder's forward pass in PyTorch on the CPU, for comparison with candle.

Same architecture and shapes as onrec's SASRec encoder (crates/model/src/sasrec.rs):
pre-norm blocks of causal self-attention and a GELU feed-forward, item and position
embeddings, context embeddings added before the output layer norm; 2 blocks, width 64,
2 heads, feed-forward 256, the last 50 items, 1682 items (MovieLens-100K); `--shape
online` is the online encoder's (1 block, width 32, feed-forward 64, the last 20 items).
Weights are random: speed does not depend on them. Run by hand (needs torch), not in CI:

    python3 scripts/bench_torch_encoder.py [--threads 2] [--shape online]

and compare with `cargo bench --bench encoder -- encoder_forward` on the same machine. It
also times encode + top-10 of 10k and 100k items for one user (batch 1), to compare with
`cargo bench --bench encoder -- encode_and_top10` (ONREC_BENCH_SHAPE=online for the
online shape).
"""
import argparse
import math
import statistics
import time

import torch
from torch import nn

ITEMS, L, D, HEADS, FF, LAYERS = 1682, 50, 64, 2, 256, 2
SHAPES = {"checkpoint": (50, 64, 256, 2), "online": (20, 32, 64, 1)}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ff1, self.ff2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x, mask):
        b, l, d = x.shape
        dh = d // HEADS
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (t.reshape(b, l, HEADS, dh).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + mask, dim=-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(b, l, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.ln2(x))))


class SasRec(nn.Module):
    def __init__(self, items=ITEMS):
        super().__init__()
        self.items, self.positions = nn.Embedding(items + 1, D), nn.Embedding(L, D)
        self.hours, self.devices = nn.Embedding(25, D), nn.Embedding(6, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_out = nn.LayerNorm(D, eps=1e-6)

    def user_vectors(self, ids, hours, devices):
        b, l = ids.shape
        real = (ids != 0).float().unsqueeze(2)
        x = (self.items(ids) * math.sqrt(D) + self.positions(torch.arange(l))) * real
        causal = torch.tril(torch.ones(l, l, dtype=torch.bool))
        allowed = causal.unsqueeze(0) & (ids != 0).unsqueeze(1)
        mask = torch.where(allowed, 0.0, -1e9).unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask) * real
        return self.ln_out(x[:, -1] + self.hours(hours) + self.devices(devices))


def timed(f, seconds):
    for _ in range(20):
        f()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def main():
    global L, D, FF, LAYERS
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="checkpoint")
    args = parser.parse_args()
    L, D, FF, LAYERS = SHAPES[args.shape]
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    model = SasRec().eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for b in (1, 32, 256):
            ids = torch.randint(1, ITEMS + 1, (b, L))
            hours, devices = torch.randint(0, 25, (b,)), torch.ones(b, dtype=torch.long)
            for _ in range(20):
                model.user_vectors(ids, hours, devices)
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                t = time.perf_counter()
                model.user_vectors(ids, hours, devices)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print(f"encoder_forward/{b}: median {med * 1e6:9.1f} us  ({b / med:10.0f} users/s, {len(times)} runs)")
        for items in (10_000, 100_000):
            model = SasRec(items).eval()
            ids = torch.randint(1, items + 1, (1, L))
            hours, devices = torch.tensor([9]), torch.ones(1, dtype=torch.long)

            def top10():
                u = model.user_vectors(ids, hours, devices)
                scores = u @ model.items.weight.T
                scores[:, 0] = float("-inf")
                return torch.topk(scores, 10, dim=1)

            med, runs = timed(top10, args.seconds)
            print(f"encode_and_top10_one_user/{items}: median {med * 1e6:9.1f} us  ({runs} runs)")


if __name__ == "__main__":
    main()
