#!/usr/bin/env python3
"""Independent fp64 NumPy reference for all-MiniLM-L6-v2 (sentence-transformers semantics):
BERT (gelu=erf, LayerNorm eps from config) -> mean pooling over attention mask -> L2 normalize.
Needs only numpy + tokenizers (pip, ~20 MB). Usage: minilm_reference.py MODEL_DIR MODEL_DIR/config.json < sentences.txt
> tests/data/minilm_reference.json (one sentence per line)."""
import json, math, struct, sys
import numpy as np
from tokenizers import Tokenizer

def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]; hdr = json.loads(f.read(n))
        buf = f.read()
    dt = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(buf[a:b], dtype=dt[v["dtype"]]).reshape(v["shape"]).astype(np.float64)
    return out

_erf = np.vectorize(math.erf)
def gelu(x): return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))   # HF "gelu" = exact erf GELU
def ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True); var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b
def lin(x, W, p): return x @ W[p + ".weight"].T + W[p + ".bias"]

def embed(W, cfg, ids, tt):
    eps, H = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    T = len(ids)
    x = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.token_type_embeddings.weight"][tt] \
        + W["embeddings.position_embeddings.weight"][:T]
    x = ln(x, W["embeddings.LayerNorm.weight"], W["embeddings.LayerNorm.bias"], eps)
    d = x.shape[-1] // H
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        q, k, v = (lin(x, W, p + "attention.self." + n).reshape(T, H, d).transpose(1, 0, 2) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, H * d)
        x = ln(lin(a, W, p + "attention.output.dense") + x, W[p + "attention.output.LayerNorm.weight"], W[p + "attention.output.LayerNorm.bias"], eps)
        h = gelu(lin(x, W, p + "intermediate.dense"))
        x = ln(lin(h, W, p + "output.dense") + x, W[p + "output.LayerNorm.weight"], W[p + "output.LayerNorm.bias"], eps)
    e = x.mean(0)                      # mean pooling (single unpadded sequence: mask all ones)
    return e / max(np.linalg.norm(e), 1e-12)   # Normalize module = F.normalize(p=2, eps=1e-12)

if __name__ == "__main__":
    mdir, cfgp = sys.argv[1], sys.argv[2]
    cfg = json.load(open(cfgp)); assert "hidden_size" in cfg, "need the BERT config.json, not 1_Pooling/config.json"
    W = load_safetensors(mdir + "/model.safetensors")
    tok = Tokenizer.from_file(mdir + "/tokenizer.json")
    tok.no_padding(); tok.enable_truncation(max_length=256)   # sentence_bert_config max_seq_length
    out = []
    for s in (l.rstrip("\n") for l in sys.stdin):
        enc = tok.encode(s)
        out.append({"text": s, "ids": enc.ids, "embedding": [round(float(v), 8) for v in embed(W, cfg, np.array(enc.ids), np.array(enc.type_ids))]})
    json.dump(out, sys.stdout)
