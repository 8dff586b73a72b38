"""Hearth's API contract: its /openapi.json is a valid OpenAPI document listing every route, its
responses validate against OpenAI's own published schemas (vendored in tests/data), and a bounded
schema-driven fuzz run (schemathesis) against /openapi.json gets no 5xx.

Run by tests/openai_python.rs, which starts the servers: HEARTH_BASE_URL (SmolLM2 as `smol`) and
HEARTH_FUZZ_URL (SmolLM2 as `smollm2-135m-instruct`, the name the schema's examples use, with at
most 16 generated tokens per request so that fuzzing stays fast).
"""
import json
import os
import subprocess
import sys
import urllib.request

import pytest
from openapi_spec_validator import validate as validate_openapi

sys.path.insert(0, os.path.dirname(__file__))
from openai_schema_check import validate  # noqa: E402

BASE = os.environ["HEARTH_BASE_URL"]
FUZZ = os.environ["HEARTH_FUZZ_URL"]
ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/chat/completions/render",
    "/v1/completions/render",
    "/v1/embeddings",
    "/v1/models",
    "/v1/usage",
    "/health",
    "/ready",
    "/metrics",
    "/openapi.json",
}


def call(path, body=None):
    req = urllib.request.Request(
        BASE + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_openapi_document_is_valid_and_lists_every_route():
    status, text = call("/openapi.json")
    assert status == 200
    doc = json.loads(text)
    assert doc["openapi"].startswith("3.1")
    validate_openapi(doc)
    assert set(doc["paths"]) == ROUTES


CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6}


@pytest.mark.parametrize("logprobs", [False, True])
def test_chat_responses_match_openai_schemas(logprobs):
    body = dict(CHAT, logprobs=logprobs, top_logprobs=2 if logprobs else None, n=2)
    status, text = call("/v1/chat/completions", body)
    assert status == 200, text
    validate("CreateChatCompletionResponse", json.loads(text))
    status, text = call(
        "/v1/chat/completions", dict(body, stream=True, stream_options={"include_usage": True})
    )
    assert status == 200, text
    chunks = [l[6:] for l in text.splitlines() if l.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    for c in chunks[:-1]:
        validate("CreateChatCompletionStreamResponse", json.loads(c))


@pytest.mark.parametrize("logprobs", [None, 2])
def test_completion_responses_match_openai_schemas(logprobs):
    body = {"model": "smol", "prompt": ["The sea is", "Stones are"], "max_tokens": 5, "logprobs": logprobs}
    status, text = call("/v1/completions", body)
    assert status == 200, text
    validate("CreateCompletionResponse", json.loads(text))
    status, text = call("/v1/completions", dict(body, stream=True))
    assert status == 200, text
    chunks = [l[6:] for l in text.splitlines() if l.startswith("data: ")]
    assert chunks[-1] == "[DONE]"
    for c in chunks[:-1]:
        chunk = json.loads(c)
        # OpenAI's schema has no stream type for completions: CreateCompletionResponse requires a
        # finish_reason, while OpenAI's own streams send null until the last chunk, as Hearth does.
        for choice in chunk["choices"]:
            if choice["finish_reason"] is None:
                choice["finish_reason"] = "stop"
        validate("CreateCompletionResponse", chunk)


def test_embedding_responses_match_openai_schemas():
    body = {"model": "all-minilm-l6-v2", "input": ["The sea is", "Stones are"], "encoding_format": "float"}
    status, text = call("/v1/embeddings", body)
    assert status == 200, text
    validate("CreateEmbeddingResponse", json.loads(text))
    status, text = call("/v1/embeddings", dict(body, input=[]))
    assert status == 400
    validate("ErrorResponse", json.loads(text))


def test_models_and_errors_match_openai_schemas():
    status, text = call("/v1/models")
    assert status == 200
    validate("ListModelsResponse", json.loads(text))
    for path, body in [
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {"model": "smol", "messages": []}),
        ("/v1/nothing", None),
    ]:
        status, text = call(path, body)
        assert status >= 400
        validate("ErrorResponse", json.loads(text))


def test_schema_driven_fuzzing_finds_no_server_error(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    out = subprocess.run(
        [
            exe, "run", FUZZ + "/openapi.json",
            "--checks", "not_a_server_error",
            "--max-examples", os.environ.get("HEARTH_FUZZ_EXAMPLES", "40"),
            "--request-timeout", "60",
            "--seed", "20261127",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "passed" in log, log[-2000:]
