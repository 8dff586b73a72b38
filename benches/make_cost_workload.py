"""Writes benches/cost_workload.jsonl: the mixed workload of `hearth bench --suite cost` (written for
this project). 1,000 completion requests over the questions of benches/route_set.jsonl, shaped like an
internal assistant's traffic:

- a shared instruction prefix on every prompt (what the prefix cache reuses);
- popularity by Zipf's law (s = 1) over the 241 questions, in a fixed shuffled order, so a few
  questions are asked often and most rarely or never;
- a question's first ask is in its original wording; each later ask is, with equal odds, the same
  text again or one of two paraphrases written per kind below (the same question, so the same
  answers are right); "fact" questions have no paraphrases and are repeated as they are;
- easy and hard questions as route_set.jsonl has them (the router's business).

Each line: {"prompt", "answers", "kind", "item", "form"} with form first | repeat | paraphrase.
Deterministic: rerun to regenerate the same file.

    python3 benches/make_cost_workload.py
"""
import json
import pathlib
import random
import re

HERE = pathlib.Path(__file__).parent
PREFIX = (
    "You are the internal assistant of a company. Answer with a short, correct completion of the "
    "text below, nothing else.\n\n"
)
REQUESTS = 1000

# (pattern over the item's prompt, two rewrites): each rewrite keeps the question's entities,
# numbers and answer.
PARAPHRASES = {
    "capital": (r"^Q: What is the capital of (.+)\?\n", [r"Q: Which city is the capital of \1?\n",
                                                         r"Q: Tell me the capital city of \1.\n"]),
    "arithmetic": (r"^Q: What is (.+)\?\n", [r"Q: How much is \1?\n", r"Q: Compute \1, please.\n"]),
    "chemistry": (r"^Q: What is the chemical symbol for (.+)\?\n",
                  [r"Q: Which chemical symbol stands for \1?\n",
                   r"Q: Give the chemical symbol of \1.\n"]),
    "author": (r"^Q: Who wrote (.+)\?\n", [r"Q: Who is the author of \1?\n",
                                           r"Q: Who was the writer of \1?\n"]),
    "opposite": (r'^The opposite of "', ['The word opposite in meaning to "',
                                         'The antonym of "']),
    "plural": (r'^The plural of "', ['The plural form of "', 'In English, the plural of "']),
    "french": (r'^The French word for "', ['In French, the word for "',
                                           'Translated into French, the word for "']),
    "sequence": (r"^Continue the list: ", ["Continue this list: ", "Complete the sequence: "]),
}


def paraphrases(item):
    rule = PARAPHRASES.get(item["kind"])
    if rule is None:
        return []
    pattern, rewrites = rule
    out = []
    for r in rewrites:
        p, n = re.subn(pattern, r, item["prompt"], count=1)
        if n != 1:
            raise SystemExit(f"no paraphrase rule fits {item['prompt']!r}")
        out.append(p)
    return out


def main():
    items = [json.loads(l) for l in (HERE / "route_set.jsonl").read_text().splitlines() if l.strip()]
    rng = random.Random(20261128)
    order = list(range(len(items)))
    rng.shuffle(order)
    weights = [1.0 / (rank + 1) for rank in range(len(order))]
    asked = set()
    lines = []
    for _ in range(REQUESTS):
        i = rng.choices(order, weights=weights)[0]
        item = items[i]
        forms = paraphrases(item)
        if i not in asked:
            form, text = "first", item["prompt"]
            asked.add(i)
        elif forms and rng.random() < 0.5:
            form, text = "paraphrase", rng.choice(forms)
        else:
            form, text = "repeat", item["prompt"]
        lines.append({"prompt": PREFIX + text, "answers": item["answers"], "kind": item["kind"],
                      "item": i, "form": form})
    out = HERE / "cost_workload.jsonl"
    out.write_text("".join(json.dumps(l) + "\n" for l in lines))
    forms = {f: sum(1 for l in lines if l["form"] == f) for f in ("first", "repeat", "paraphrase")}
    print(f"{out}: {len(lines)} requests over {len(asked)} questions; {forms}")


if __name__ == "__main__":
    main()
