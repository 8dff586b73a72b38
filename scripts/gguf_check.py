"""GGUF on CUDA (run by scripts/gpu-check.sh on the GPU machine, after gpu_check.py): Hearth's CUDA path
on quantized GGUF files against Hearth's CPU path on the same files (which the test suite checks against
candle's reference kernels and real models), both measured against an independent reference:
transformers' Llama in f32 on the GPU, with the files' weights dequantized by the `gguf` package.

The GPU machine has no network and the carry to it is small, so the files are made there: a
Llama-architecture model with random weights (seeded), its matrices quantized with the `gguf` package
from PyPI (carried along as an unpacked wheel, --gguf-lib), one file per quantization type, with the
carried tokenizer.json's vocabulary and merges as GGUF tokenizer metadata.

For each file: `hearth logits` (prefill, cached prefill, decode rows of 8 prompts; the decode rows from
a CUDA graph replay) on cuda:0 and on the CPU, and the reference's logits at the same positions.
Passes when Hearth-CUDA's mean absolute error against the reference is within ERROR_FACTOR x
Hearth-CPU's (the CPU rounds activations to 8 bits for its integer dot products, so its error is the
yardstick of what quantized arithmetic costs), and CUDA's argmax agrees with the reference wherever the
reference's top-2 margin exceeds twice CUDA's largest error. Prints a Markdown table and appends it to
--out.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ERROR_FACTOR = 2.0
PROMPT_LENS = [7, 16, 33, 64, 100, 129, 250, 511]
QTYPES = ["Q8_0", "Q4_1"]
T0 = time.time()


def log(*a):
    print(f"[gguf-check {time.time() - T0:6.1f}s]", *a, file=sys.stderr, flush=True)


def tokenizer_metadata(path):
    tok = json.load(open(path))
    vocab = dict(tok["model"]["vocab"])
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"<unused{i}>" for i in range(n)]
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, merges


SHAPE = dict(hidden=1024, ffn=2816, layers=4, heads=16, kv_heads=4, head_dim=64)


def make_gguf(gguf, path, qtype, tokens, merges, seed=0):
    """Writes the file; returns its weights as the dequantized f32 arrays Hearth reads."""
    rng = np.random.default_rng(seed)
    hidden, ffn, layers = SHAPE["hidden"], SHAPE["ffn"], SHAPE["layers"]
    heads, kv_heads, head_dim = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    vocab = len(tokens)
    weights = {}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def matrix(name, rows, cols, std=0.02):
        data = rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)
        packed = gguf.quants.quantize(data, q)
        w.add_tensor(name, packed, raw_dtype=q)
        weights[name] = gguf.quants.dequantize(packed, q).reshape(rows, cols)

    def norm(name):
        data = (1.0 + rng.normal(0.0, 0.1, size=hidden)).astype(np.float32)
        w.add_tensor(name, data)
        weights[name] = data

    # Tied output projection (no output.weight): the embedding is read both ways, as in SmolLM2.
    matrix("token_embd.weight", vocab, hidden, std=0.05)
    norm("output_norm.weight")
    for i in range(layers):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight")
        matrix(f"{p}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"{p}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"{p}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"{p}.attn_output.weight", hidden, heads * head_dim)
        norm(f"{p}.ffn_norm.weight")
        matrix(f"{p}.ffn_gate.weight", ffn, hidden)
        matrix(f"{p}.ffn_up.weight", ffn, hidden)
        matrix(f"{p}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB, {qtype}")
    return weights


def unpermute(w, n_head):
    """llama.cpp's converter reorders Q and K rows for interleaved RoPE pairs; back to Hugging Face's
    halves layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_logits(weights, vocab, prompts, rows_meta):
    """transformers' LlamaForCausalLM in f32 on the GPU with the file's dequantized weights."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    else:
        rope = {"rope_theta": 10000.0}
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                      max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      **rope)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).float().eval()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    sd = {"model.embed_tokens.weight": t(weights["token_embd.weight"]),
          "model.norm.weight": t(weights["output_norm.weight"]),
          "lm_head.weight": t(weights["token_embd.weight"])}
    for i in range(s["layers"]):
        p, h = f"blk.{i}", f"model.layers.{i}"
        sd[f"{h}.input_layernorm.weight"] = t(weights[f"{p}.attn_norm.weight"])
        sd[f"{h}.post_attention_layernorm.weight"] = t(weights[f"{p}.ffn_norm.weight"])
        sd[f"{h}.self_attn.q_proj.weight"] = t(unpermute(weights[f"{p}.attn_q.weight"], s["heads"]))
        sd[f"{h}.self_attn.k_proj.weight"] = t(unpermute(weights[f"{p}.attn_k.weight"], s["kv_heads"]))
        sd[f"{h}.self_attn.v_proj.weight"] = t(weights[f"{p}.attn_v.weight"])
        sd[f"{h}.self_attn.o_proj.weight"] = t(weights[f"{p}.attn_output.weight"])
        sd[f"{h}.mlp.gate_proj.weight"] = t(weights[f"{p}.ffn_gate.weight"])
        sd[f"{h}.mlp.up_proj.weight"] = t(weights[f"{p}.ffn_up.weight"])
        sd[f"{h}.mlp.down_proj.weight"] = t(weights[f"{p}.ffn_down.weight"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise SystemExit(f"reference weights: missing {missing}, unexpected {unexpected}")
    from gpu_check import reference_logits as rows_of  # the same row gathering as the main check

    return rows_of(model, prompts, rows_meta)


def logits(binary, model, prompts, work, device, env=None):
    tag = "-".join([device.replace(":", "")] + [f"{k}{v}" for k, v in (env or {}).items()])
    out = os.path.join(work, f"{os.path.basename(model)}-{tag}.bin")
    cmd = [binary, "logits", "--model", model, "--prompts", prompts, "--out", out, "--device", device]
    log("$", " ".join(cmd), env or "")
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"hearth logits failed on {device}")
    meta = json.loads(r.stdout)
    rows = np.fromfile(out, dtype="<f4").reshape(len(meta["rows"]), meta["vocab"])
    return meta, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--gguf-lib", required=True)
    ap.add_argument("--work", default="/tmp/gguf-check")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, a.gguf_lib)
    import gguf  # noqa: E402 (carried, not installed)

    os.makedirs(a.work, exist_ok=True)
    tokens, merges = tokenizer_metadata(a.tokenizer)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, len(tokens) - 64, size=n).tolist() for n in PROMPT_LENS]
    ppath = os.path.join(a.work, "prompts.json")
    json.dump(prompts, open(ppath, "w"))
    lines = [
        "",
        "GGUF on CUDA against Hearth's CPU path (random Llama, hidden 1024, 4 layers, 16 / 4 heads, "
        "tied embeddings; 8 prompts x prefill, cached prefill, decode):",
        "",
        "| file | logit std (reference) | CUDA vs reference: max / mean abs error | CPU vs reference: "
        "max / mean abs error | max abs diff CUDA vs CPU | argmax agrees (decided rows) "
        "| decode graph replay vs first | result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    detail = [
        "",
        "Mean abs error against the reference by step (prefill / cached prefill / decode), and with "
        "candle's dequantize-to-f32 matmuls instead of its integer MMQ/MMVQ kernels (HEARTH_CUDA_DMMV=1):",
        "",
        "| file | CUDA | CUDA, dequantized matmuls | CPU |",
        "| --- | --- | --- | --- |",
    ]
    ok = True
    for qtype in QTYPES:
        path = os.path.join(a.work, f"random-llama-{qtype.lower()}.gguf")
        weights = make_gguf(gguf, path, qtype, tokens, merges)
        meta, gpu = logits(a.bin, path, ppath, a.work, "cuda:0")
        _, cpu = logits(a.bin, path, ppath, a.work, "cpu")
        _, dmmv = logits(a.bin, path, ppath, a.work, "cuda:0", {"HEARTH_CUDA_DMMV": "1"})
        ref = reference_logits(weights, len(tokens), prompts, meta["rows"])

        def by_step(x):
            cells = []
            for step in ("prefill", "cached-prefill", "decode"):
                rows = [i for i, r in enumerate(meta["rows"]) if r["step"] == step]
                cells.append(f"{np.abs(x[rows] - ref[rows]).mean():.4f}")
            return " / ".join(cells)

        detail.append(f"| {qtype} | {by_step(gpu)} | {by_step(dmmv)} | {by_step(cpu)} |")
        eg, ec = np.abs(gpu - ref), np.abs(cpu - ref)
        top2 = np.sort(ref, axis=1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) > 2 * float(eg.max())
        agree = int((gpu.argmax(1) == ref.argmax(1))[decided].sum())
        passed = bool(eg.mean() <= ERROR_FACTOR * ec.mean() and agree == int(decided.sum()))
        ok &= passed
        lines.append(
            f"| {qtype} | {ref.std():.4f} | {eg.max():.4f} / {eg.mean():.5f} | {ec.max():.4f} / "
            f"{ec.mean():.5f} | {np.abs(gpu - cpu).max():.4f} | {agree} / {int(decided.sum())} "
            f"| {meta.get('graph_replay_vs_first_max')} | {'PASS' if passed else 'FAIL'} |"
        )
        log(lines[-1])
    text = "\n".join(lines + detail)
    print(text)
    with open(a.out, "a") as f:
        f.write(text + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
