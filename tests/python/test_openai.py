"""The official `openai` Python client against a running Hearth server.

Run by tests/openai_python.rs, which starts the servers and sets HEARTH_BASE_URL (SmolLM2 as `smol`)
and HEARTH_TINY_URL (one running and one waiting slot, 4 KiB bodies, to provoke 429 and 413).
"""
import asyncio
import json
import os
import threading

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

BASE = os.environ["HEARTH_BASE_URL"] + "/v1"
TINY = os.environ["HEARTH_TINY_URL"] + "/v1"
MODEL = "smol"


@pytest.fixture(scope="module")
def client():
    return OpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)


def chat(client, content, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


def test_chat_non_streaming(client):
    r = chat(client, "Name three fruits.", max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_equals_non_streaming_and_reports_usage_last(client):
    whole = chat(client, "Write one sentence about rivers.", max_tokens=24, temperature=0)
    stream = chat(
        client,
        "Write one sentence about rivers.",
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]


def test_completions_streaming_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    s = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    multi = client.completions.create(model=MODEL, prompt=["One", "Two"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in multi.choices) == [0, 1]


def test_stop_strings_cut_the_text(client):
    full = client.completions.create(
        model=MODEL, prompt="List: apple, banana,", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].text
    assert len(full) > 12
    stop = full[6:9]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(
            model=MODEL,
            prompt="List: apple, banana,",
            max_tokens=24,
            temperature=0,
            stop=[stop, "never-appears"],
            stream=stream,
            extra_body={"ignore_eos": True},
        )
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason][-1]
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == cut
        assert reason == "stop"


def test_n_choices_and_seed_reproducibility(client):
    kw = dict(max_tokens=12, temperature=1.0, seed=1234, n=2)
    a = chat(client, "Invent a name for a cat.", **kw)
    b = chat(client, "Invent a name for a cat.", **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    other = chat(client, "Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=99)
    texts = {c.message.content for c in a.choices} | {other.choices[0].message.content}
    assert len(texts) >= 2, "different seeds should give different samples"


def test_logprobs(client):
    r = chat(client, "Say hello.", max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 4
    assert all(len(t) <= 2 for t in c.choices[0].logprobs.top_logprobs)


def test_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", max_tokens=4, temperature=-3)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_body_too_large_and_queue_full():
    tiny = OpenAI(base_url=TINY, api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as e:
        tiny.completions.create(model=MODEL, prompt="x" * 10000, max_tokens=1)
    assert e.value.status_code == 413
    # Hold the one running and the one waiting slot, then the next request is refused.
    hold = dict(model=MODEL, prompt="Once", max_tokens=300, stream=True, extra_body={"ignore_eos": True})
    running = tiny.completions.create(**hold)
    next(iter(running))  # its first token arrived: it is running
    waiting = tiny.completions.create(**hold)
    streams = [running, waiting]
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(20):
            tiny.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.response.headers.get("retry-after") == "1"
    for s in streams:
        s.close()


def test_32_concurrent_streams_match_their_solo_output(client):
    prompts = [f"Give a one-line fact about the number {i}." for i in range(32)]
    solo = [
        chat(client, p, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
        for p in prompts
    ]

    async def one(ac, p):
        s = await ac.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": p}],
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        out = []
        async for c in s:
            if c.choices and c.choices[0].delta.content:
                out.append(c.choices[0].delta.content)
        return "".join(out)

    async def main():
        ac = AsyncOpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(ac, p) for p in prompts))

    together = asyncio.run(main())
    assert together == solo


def test_route_groups_work_through_the_client():
    """`auto` and a group that always escalates, over SmolLM2 (`small`) and Gemma 3 (`large`)."""
    routed = OpenAI(base_url=os.environ["HEARTH_ROUTED_URL"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    ids = [m.id for m in routed.models.list()]
    assert ids == ["small", "large", "auto", "escalate", "all-minilm-l6-v2", "all-minilm-l6-v2-questions"]
    kw = dict(messages=[{"role": "user", "content": "Name a planet."}], max_tokens=10, temperature=0)
    # Chat goes only to a model with its own chat template: Gemma 3 here is a base model without one.
    auto = routed.chat.completions.create(model="auto", **kw)
    assert auto.model == "small"
    assert auto.model_extra["metrics"]["route"]["model"] == auto.model
    assert auto.model_extra["metrics"]["route"]["tried"] == ["small"]
    kw = dict(prompt="The largest planet of the solar system is", max_tokens=10, temperature=0)
    whole = routed.completions.create(model="escalate", **kw)
    direct = routed.completions.create(model="large", **kw)
    assert whole.model == "large"
    assert whole.choices[0].text == direct.choices[0].text
    chunks = list(routed.completions.create(
        model="escalate", stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.model == "large" for c in chunks)
    streamed = "".join(c.choices[0].text or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].model_extra["metrics"]["route"]["escalated"] is True


def test_structured_output_parses_into_a_pydantic_model(client):
    """`chat.completions.parse` sends the model's JSON schema (strict); the answer must parse back."""
    from typing import Literal, Optional

    from pydantic import BaseModel, Field

    class Skill(BaseModel):
        title: str = Field(max_length=16)
        level: int = Field(ge=1, le=5)

    class Person(BaseModel):
        name: str = Field(max_length=24)
        age: int = Field(ge=0, le=120)
        role: Literal["engineer", "teacher", "doctor"]
        skills: list[Skill] = Field(max_length=3)
        nickname: Optional[str] = Field(max_length=16)

    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a fictional teacher."}],
        response_format=Person, max_tokens=200, temperature=0,
    )
    assert r.choices[0].finish_reason == "stop"
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)
    assert 0 <= person.age <= 120 and len(person.skills) <= 3
    # Streamed through the client's structured-output helper: the same object.
    with client.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Describe a fictional teacher."}],
        response_format=Person, max_tokens=200, temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == person


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


def test_tool_calls_round_trip_streamed_or_not(client):
    import json

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_tokens=80, temperature=0)
    r = client.chat.completions.create(messages=msgs, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")

    # Streamed: the same call, assembled from the deltas as clients do.
    name, arguments, reasons = "", "", []
    for chunk in client.chat.completions.create(messages=msgs, stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                assert d.index == 0
                name += d.function.name or ""
                arguments += d.function.arguments or ""
            reasons.append(c.finish_reason)
    assert name == "get_weather" and json.loads(arguments) == args
    assert reasons[-1] == "tool_calls"

    # The result goes back into the conversation; the model answers in text.
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert answer.choices[0].message.content
    assert not answer.choices[0].message.tool_calls
    # The call and its result are in the prompt the model read.
    alone = client.chat.completions.create(model=MODEL, messages=msgs[:1], max_tokens=1, temperature=0)
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_langchain_bind_tools_and_with_structured_output_work_unchanged():
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(base_url=BASE, api_key="unused", model=MODEL, temperature=0, max_tokens=120,
                     max_retries=0, timeout=120)

    class GetWeather(BaseModel):
        """Current weather in a city."""
        city: str = Field(max_length=30)

    msg = llm.bind_tools([GetWeather], tool_choice="required").invoke("What is the weather in Paris?")
    assert msg.tool_calls, msg
    assert msg.tool_calls[0]["name"] == "GetWeather"
    assert isinstance(msg.tool_calls[0]["args"]["city"], str)

    class Person(BaseModel):
        name: str = Field(max_length=24)
        age: int = Field(ge=0, le=120)

    person = llm.with_structured_output(Person).invoke("Describe a fictional teacher.")
    assert isinstance(person, Person) and 0 <= person.age <= 120


EMBEDDER = "all-minilm-l6-v2"
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "minilm_reference.json")


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_embeddings_match_the_reference_in_both_encodings_and_from_token_ids(client):
    with open(REFERENCE) as f:
        refs = json.load(f)
    texts = [r["text"] for r in refs]
    # The client asks for base64 unless told otherwise and decodes it itself.
    b64 = client.embeddings.create(model=EMBEDDER, input=texts, extra_body={"truncate": True})
    flt = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float", extra_body={"truncate": True})
    ids = client.embeddings.create(model=EMBEDDER, input=[r["ids"] for r in refs], encoding_format="float")
    assert b64.model == EMBEDDER and b64.object == "list"
    assert b64.usage.prompt_tokens == sum(len(r["ids"]) for r in refs) == b64.usage.total_tokens
    assert [d.index for d in b64.data] == list(range(len(refs)))
    for r, a, b, c in zip(refs, b64.data, flt.data, ids.data):
        assert len(a.embedding) == 384
        assert a.embedding == pytest.approx(b.embedding, abs=1e-7), r["text"]
        assert cosine(a.embedding, r["embedding"]) > 1 - 1e-4, r["text"]
        assert cosine(c.embedding, r["embedding"]) > 1 - 1e-4, r["text"]
    one = client.embeddings.create(model=EMBEDDER, input=texts[2], dimensions=384)
    assert cosine(one.data[0].embedding, refs[2]["embedding"]) > 1 - 1e-4
    assert EMBEDDER in [m.id for m in client.models.list()]


def test_embedding_errors_are_400s_with_clear_messages(client):
    long = "word " * 400
    for kw, says in [
        (dict(input=[]), "empty array"),
        (dict(input=""), "empty"),
        (dict(input=["x"] * 2049), "at most 2048"),
        (dict(input=long), "embeds at most 256"),
        (dict(input=[long, "short"]), "input 0 has"),
        (dict(input=5), "must be a string"),
        (dict(input=["a", 1]), "only strings"),
        (dict(input=[[101, 99999, 102]]), "out of range"),
        (dict(input="x", dimensions=128), "`dimensions` may only be 384"),
        (dict(input="x", encoding_format="int8"), "`float` or `base64`"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model=EMBEDDER, **kw)
        assert says in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError, match="text-generation model"):
        client.embeddings.create(model=MODEL, input="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.chat.completions.create(model=EMBEDDER, messages=[{"role": "user", "content": "hi"}])


def test_concurrent_embedding_requests_each_get_their_own_vectors():
    with open(REFERENCE) as f:
        refs = json.load(f)[:5]
    aclient = AsyncOpenAI(base_url=BASE, api_key="unused", max_retries=0, timeout=120)

    async def run():
        return await asyncio.gather(
            *[aclient.embeddings.create(model=EMBEDDER, input=r["text"]) for r in refs * 4]
        )

    out = asyncio.run(run())
    for r, got in zip(refs * 4, out):
        assert cosine(got.data[0].embedding, r["embedding"]) > 1 - 1e-4, r["text"]
