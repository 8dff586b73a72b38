#!/usr/bin/env python3
"""Trains the semantic response cache's question-matching adapter for all-MiniLM-L6-v2.

all-MiniLM-L6-v2 puts a question and the same question heavily reworded further apart than a
question and another one on the same topic ("how long is the warranty" / "what does the warranty
cover"), so no threshold on its similarity both hits reworded questions and refuses near misses.
This script fine-tunes it on the project's labelled question pairs (benches/cache_pairs*.jsonl:
paraphrases that must hit, near misses that must not) and writes the change as a low-rank adapter
(LoRA: W += alpha / rank * B @ A on the attention and feed-forward projections of the upper layers),
which Hearth merges into the base weights when it loads the model (`adapter` of an embedding model).
The base model itself is untouched, so `/v1/embeddings` of the base model keeps sentence-
transformers' vectors.

Loss: CoSENT over the labelled pairs of a batch (every near miss should score below every
paraphrase: that is what one threshold needs), plus in-batch negatives for the paraphrases at a
lower weight (a question should stay nearer its paraphrase than unrelated questions). The lower
`--frozen` layers are not trained; their outputs are computed once.

Needs (pip, CPU wheels): numpy==2.4.6 tokenizers==0.23.3 safetensors==0.8.0 jax==0.10.2 optax==0.2.8.
About 4 minutes on two CPU cores; the same inputs give the same adapter on the same machine.

    python3 scripts/train_cache_adapter.py --model models/all-minilm-l6-v2 \\
        --out src/embedding/question_adapter.safetensors \\
        --reference tests/data/question_adapter_reference.json \\
        benches/cache_pairs.jsonl benches/cache_pairs_heldout.jsonl ...

To measure on a set it did not see, train without that set and run
`hearth bench --suite cache --model models/all-minilm-l6-v2 --adapter OUT --data SET`.
"""
import argparse
import json
import math
import pathlib
import random
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import minilm_reference as ref  # noqa: E402

TARGETS = ["attention.self.query", "attention.self.key", "attention.self.value",
           "attention.output.dense", "intermediate.dense", "output.dense"]
# Sentences whose adapted embeddings the Rust test compares with (fp64 NumPy, independent code).
REFERENCE_SENTENCES = [
    "How long is the warranty on this laptop?",
    "what does the laptop warranty cover",
    "how do i reset my vpn password",
    "What's the procedure to reset the password for my VPN?",
    "Which city is the capital of Australia?",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the all-MiniLM-L6-v2 folder")
    ap.add_argument("--out", required=True, help="the adapter (safetensors) to write")
    ap.add_argument("--reference", help="also write adapted fp64 reference embeddings here (JSON)")
    ap.add_argument("--frozen", type=int, default=2, help="lower layers left as they are")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-batch-weight", type=float, default=0.3)
    ap.add_argument("pairs", nargs="+", help="labelled pair sets (JSON lines: a, b, label)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    mdir = pathlib.Path(args.model)
    cfg = json.loads((mdir / "config.json").read_text())
    base = {k: v.astype(np.float32) for k, v in ref.load_safetensors(str(mdir / "model.safetensors")).items()}
    W = {k: jnp.asarray(v) for k, v in base.items()}
    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=256)
    heads, eps, n_layers = cfg["num_attention_heads"], cfg["layer_norm_eps"], cfg["num_hidden_layers"]
    hidden_size = cfg["hidden_size"]
    trained = range(args.frozen, n_layers)
    scale = args.alpha / args.rank

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + eps) * w + b

    def lin(x, P, l, t):
        p = f"encoder.layer.{l}.{t}"
        y = x @ W[p + ".weight"].T + W[p + ".bias"]
        if f"{p}.lora_a" in P:
            y = y + (x @ P[f"{p}.lora_a"].T) @ P[f"{p}.lora_b"].T * scale
        return y

    def layers(P, x, mask, lo, hi):
        B, T, _ = x.shape
        d = hidden_size // heads
        bias = (1.0 - mask[:, None, None, :]) * -1e9
        for l in range(lo, hi):
            q, k, v = (lin(x, P, l, "attention.self." + n).reshape(B, T, heads, d).transpose(0, 2, 1, 3)
                       for n in ("query", "key", "value"))
            s = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias, -1)
            a = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, hidden_size)
            p = f"encoder.layer.{l}."
            x = ln(lin(a, P, l, "attention.output.dense") + x,
                   W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"])
            h = jax.nn.gelu(lin(x, P, l, "intermediate.dense"), approximate=False)
            x = ln(lin(h, P, l, "output.dense") + x, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"])
        return x

    @jax.jit
    def bottom(ids, mask):
        T = ids.shape[1]
        x = (W["embeddings.word_embeddings.weight"][ids] + W["embeddings.token_type_embeddings.weight"][0]
             + W["embeddings.position_embeddings.weight"][:T][None])
        x = ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"])
        return layers({}, x, mask, 0, args.frozen)

    def top(P, x, mask):
        x = layers(P, x, mask, args.frozen, n_layers)
        e = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

    # The frozen layers' outputs, once per distinct text.
    frozen_out = {}

    def batch(texts):
        todo = [t for t in dict.fromkeys(texts) if t not in frozen_out]
        for i in range(0, len(todo), 64):
            chunk = todo[i:i + 64]
            ids = [tok.encode(t).ids for t in chunk]
            T = max(map(len, ids))
            a = np.zeros((len(chunk), T), np.int32)
            m = np.zeros((len(chunk), T), np.float32)
            for j, e in enumerate(ids):
                a[j, :len(e)] = e
                m[j, :len(e)] = 1
            out = np.asarray(bottom(jnp.asarray(a), jnp.asarray(m)))
            for j, t in enumerate(chunk):
                frozen_out[t] = out[j, :len(ids[j])]
        xs = [frozen_out[t] for t in texts]
        T = (max(len(x) for x in xs) + 7) // 8 * 8  # fewer shapes to compile
        X = np.zeros((len(xs), T, hidden_size), np.float32)
        m = np.zeros((len(xs), T), np.float32)
        for i, x in enumerate(xs):
            X[i, :len(x)] = x
            m[i, :len(x)] = 1
        return jnp.asarray(X), jnp.asarray(m)

    lam = 20.0

    def loss_fn(P, xa, ma, xb, mb, y):
        ea, eb = top(P, xa, ma), top(P, xb, mb)
        cos = (ea * eb).sum(-1)
        # CoSENT: log(1 + sum over (near miss i, paraphrase j) of exp(lam * (cos_i - cos_j))).
        diff = lam * (cos[:, None] - cos[None, :])
        violated = jnp.where((1 - y)[:, None] * y[None, :] > 0, diff, -1e9).ravel()
        cosent = jax.nn.logsumexp(jnp.concatenate([jnp.zeros(1), violated]))
        lp = jax.nn.log_softmax(lam * (ea @ eb.T), -1)
        in_batch = -(jnp.diag(lp) * y).sum() / jnp.maximum(y.sum(), 1)
        return cosent + args.in_batch_weight * in_batch

    pairs = []
    for path in args.pairs:
        pairs += [json.loads(line) for line in open(path) if line.strip()]
    if len(pairs) < args.batch:
        sys.exit(f"{len(pairs)} pairs: at least one batch ({args.batch}) is needed")
    rnd = random.Random(args.seed)
    key = jax.random.PRNGKey(args.seed)
    P = {}
    for l in trained:
        for t in TARGETS:
            out_dim, in_dim = base[f"encoder.layer.{l}.{t}.weight"].shape
            key, sub = jax.random.split(key)
            P[f"encoder.layer.{l}.{t}.lora_a"] = jax.random.normal(sub, (args.rank, in_dim)) / math.sqrt(in_dim)
            P[f"encoder.layer.{l}.{t}.lora_b"] = jnp.zeros((out_dim, args.rank))
    steps = args.epochs * (len(pairs) // args.batch)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, 10, steps), weight_decay=0.01)
    state = opt.init(P)

    @jax.jit
    def step(P, state, xa, ma, xb, mb, y):
        loss, grad = jax.value_and_grad(loss_fn)(P, xa, ma, xb, mb, y)
        updates, state = opt.update(grad, state, P)
        return optax.apply_updates(P, updates), state, loss

    for epoch in range(args.epochs):
        order = list(range(len(pairs)))
        rnd.shuffle(order)
        total, n, t0 = 0.0, 0, time.time()
        for i in range(0, len(order) - args.batch + 1, args.batch):
            chunk = [pairs[j] for j in order[i:i + args.batch]]
            # Either side may be the cached one: train both directions.
            ab = [(p["a"], p["b"]) if rnd.random() < 0.5 else (p["b"], p["a"]) for p in chunk]
            xa, ma = batch([a for a, _ in ab])
            xb, mb = batch([b for _, b in ab])
            y = jnp.asarray([1.0 if p["label"] == "hit" else 0.0 for p in chunk])
            P, state, loss = step(P, state, xa, ma, xb, mb, y)
            total += float(loss)
            n += 1
        print(f"epoch {epoch}: loss {total / n:.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)

    tensors = {k: np.asarray(v, np.float32) for k, v in P.items()}
    n_params = sum(v.size for v in tensors.values())
    tensors["scale"] = np.array([scale], np.float32)
    # Which weights it was trained on: the sum of each adapted weight, in the order of the names.
    stems = sorted(k[: -len(".lora_a")] for k in tensors if k.endswith(".lora_a"))
    tensors["base_sums"] = np.array([base[s + ".weight"].astype(np.float64).sum() for s in stems], np.float32)
    meta = {"base": "sentence-transformers/all-MiniLM-L6-v2", "rank": str(args.rank), "alpha": str(args.alpha),
            "trained_on": ",".join(pathlib.Path(p).name for p in args.pairs), "pairs": str(len(pairs)),
            "epochs": str(args.epochs), "frozen_layers": str(args.frozen), "seed": str(args.seed)}
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: {n_params} parameters", file=sys.stderr)

    if args.reference:
        # The merged model through the independent fp64 NumPy reference (erf GELU, mean pooling).
        merged = dict(ref.load_safetensors(str(mdir / "model.safetensors")))
        for l in trained:
            for t in TARGETS:
                p = f"encoder.layer.{l}.{t}"
                a = tensors[p + ".lora_a"].astype(np.float64)
                b = tensors[p + ".lora_b"].astype(np.float64)
                merged[p + ".weight"] = merged[p + ".weight"] + float(tensors["scale"][0]) * (b @ a)
        tok.enable_truncation(max_length=256)
        out = []
        for s in REFERENCE_SENTENCES:
            enc = tok.encode(s)
            e = ref.embed(merged, cfg, np.array(enc.ids), np.array(enc.type_ids))
            out.append({"text": s, "embedding": [round(float(v), 8) for v in e]})
        pathlib.Path(args.reference).write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
