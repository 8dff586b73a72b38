#!/usr/bin/env bash
# Cost of constrained decoding: interleaved A/B rounds on one running server, 16 concurrent streams of
# 64 tokens, unconstrained vs a JSON schema that cannot end before max_tokens (an array of at least
# 200 short strings), so both arms generate the same tokens per stream. Prints, per pair and arm,
# aggregate tok/s (end to end: per-request grammar setup included) and ITL p50 (the decode step).
#   bash benches/grammar_ab.sh http://127.0.0.1:8341 smollm2-135m-instruct 8
set -euo pipefail
url=$1 model=$2 pairs=${3:-8}
schema='{"type": "json_schema", "json_schema": {"name": "list", "schema": {"type": "array", "minItems": 200, "items": {"type": "string", "maxLength": 12}}}}'
dir=$(dirname "$0")
# Warm-up, not recorded: the first constrained request builds the model's grammar compiler (its
# vocabulary trie), a one-time cost that is not the per-step mask cost measured here.
python3 "$dir/serve_stream.py" --url "$url" --model "$model" --concurrency 16 --max-tokens 8 --rounds 1 --response-format "$schema" > /dev/null
for i in $(seq 1 "$pairs"); do
    if (( i % 2 )); then order="plain json"; else order="json plain"; fi
    for arm in $order; do
        if [ "$arm" = plain ]; then
            r=$(python3 "$dir/serve_stream.py" --url "$url" --model "$model" --concurrency 16 --max-tokens 64 --rounds 1 | tail -1)
        else
            r=$(python3 "$dir/serve_stream.py" --url "$url" --model "$model" --concurrency 16 --max-tokens 64 --rounds 1 --response-format "$schema" | tail -1)
        fi
        # pair, arm, aggregate tok/s, ITL p50 ms
        echo "$i $arm $(echo "$r" | sed -E 's/best ([0-9.]+) tok\/s.*ITL p50 ([0-9.]+) ms/\1 \2/')"
    done
done
