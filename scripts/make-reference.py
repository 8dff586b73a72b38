#!/usr/bin/env python3
"""Write tests/data/reference.json: an independent reference from llama.cpp (through the
llama-cpp-python package, which must already be installed) on the same GGUF files Hearth loads.

For Gemma 3 (no usable candle reference, see ../shared/DESIGN.md): each prompt's token ids, the
top-64 last-position logits, and a 32-token greedy continuation with each step's top-2 logit margin.
For both models: token ids of tricky strings, to check Hearth's GGUF tokenizers.

Usage: python3 scripts/make-reference.py [models-dir]
"""
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models")

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Question: What is 17 times 23?\nAnswer:",
    "In 1492, Columbus sailed across the Atlantic Ocean. The voyage",
]
TOKENIZER_CASES = [
    "The capital of France is",
    "Numbers 1234567 and 3.14159, dates 2026-11-27.",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "héllo wörld — naïve café 東京 🙂",
    "snake_case camelCase HTTPServer x**2 != y",
]


def top_k(logits, k):
    idx = np.argsort(-logits, kind="stable")[:k]
    return [[int(i), float(logits[i])] for i in idx]


def greedy(llm, toks, n):
    llm.reset()
    llm.eval(toks)
    out = []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        order = np.argsort(-logits, kind="stable")[:2]
        nxt = int(order[0])
        out.append([nxt, float(logits[order[0]] - logits[order[1]])])
        llm.eval([nxt])
    return out


def main():
    data = {"generator": "llama-cpp-python " + __import__("llama_cpp").__version__, "models": {}}
    for name, fname, full in [
        ("gemma3", "gemma-3-270m-q4_k_m.gguf", True),
        ("smollm2", "smollm2-135m-instruct-q4_1.gguf", False),
    ]:
        llm = Llama(
            model_path=os.path.join(MODELS, fname),
            n_ctx=1024,
            n_batch=512,
            logits_all=True,
            n_threads=2,
            seed=0,
            verbose=False,
        )
        entry = {"tokenizer": []}
        for text in TOKENIZER_CASES:
            ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            entry["tokenizer"].append({"text": text, "ids": [int(t) for t in ids]})
        if full:
            entry["prompts"] = []
            for p in PROMPTS:
                toks = llm.tokenize(p.encode("utf-8"), add_bos=True, special=False)
                llm.reset()
                llm.eval(toks)
                logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
                entry["prompts"].append(
                    {
                        "text": p,
                        "ids": [int(t) for t in toks],
                        "argmax": int(np.argmax(logits)),
                        "top_logits": top_k(logits, 64),
                        "greedy": greedy(llm, toks, 32),
                    }
                )
        data["models"][name] = entry
    out = os.path.join(ROOT, "tests", "data", "reference.json")
    with open(out, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    print("wrote", out)


if __name__ == "__main__":
    main()
