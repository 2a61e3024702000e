"""The OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client (raw HTTP, through its own httpx2,
for what the client would refuse to send): answers equal the same requests run alone, streaming, protection."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import openai
import pytest

import llmdrop_rt
from llmdrop_rt.serve.server import BackgroundServer, ServerSettings

MODEL = "tiny-llama3"
PROMPTS = ["The quick brown fox", "Once upon a time", "x", "Numbers: 1, 2, 3,", "A fairly long prompt that fills "
           "several dozen byte-level tokens of the tiny model's context", "Hello", "Q: why? A:", "zzz"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return llmdrop_rt.load(tiny_checkpoints["llama3"])


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(llm, ServerSettings(MODEL, max_batch=8, max_len=256, max_queue=64)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def alone(llm, prompt, max_tokens, stop=None):
    """The greedy continuation of the prompt run alone through the library's static batch."""
    return llm.generate(prompt, max_new_tokens=max_tokens, stop=stop)[0]


def finished(server, reason):
    return server.worker.finished[reason]


def wait_until_idle(server):
    """Until the rows earlier tests left (a timed-out one is cancelled at the next step) have gone."""
    for _ in range(200):
        if server.worker.running == server.worker.queue_depth == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server never went idle")


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx2.get(server.url.removesuffix("/v1") + "/health").json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    metrics = httpx2.get(server.url.removesuffix("/v1") + "/metrics").text
    for name in ("llmdrop_rt_requests_total{", "llmdrop_rt_generated_tokens_total ", "llmdrop_rt_queue_depth ",
                 "llmdrop_rt_tokens_per_second ", 'llmdrop_rt_finished_requests_total{reason="length"}'):
        assert name in metrics


def test_completion_equals_the_request_alone(llm, client):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == alone(llm, PROMPTS[0], 20)
    assert answer.choices[0].finish_reason == "length" and answer.choices[0].index == 0
    prompt_tokens = len(llm.tokenizer.encode(PROMPTS[0]))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == \
        (prompt_tokens, 20, prompt_tokens + 20)


def test_chat_and_streams_equal_the_plain_answers(llm, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    expected = alone(llm, llm.chat_prompt(messages), 24)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 24

    pieces = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == alone(llm, PROMPTS[1], 16)
    assert [p.choices[0].finish_reason for p in pieces][-1] == "length"


def test_stop_strings_cut_plain_and_streamed_answers(llm, client):
    full = alone(llm, PROMPTS[3], 30)
    stop = full[9:12]
    expected = full[:full.index(stop)]
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=[stop])
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(p.choices[0].text for p in streamed) == expected


def test_32_concurrent_clients_each_get_their_own_answer(llm, server, client):
    """32 clients x 3 requests over 8 rows: requests wait, join and leave the batch continuously."""
    cases = [(PROMPTS[i], 8 + 3 * i) for i in range(len(PROMPTS))]
    expected = [alone(llm, prompt, max_tokens) for prompt, max_tokens in cases]

    def one_client(index):
        answers = []
        for round_ in range(3):
            case = (index + round_) % len(cases)
            prompt, max_tokens = cases[case]
            if (index + round_) % 2:
                stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0, stream=True)
                text = "".join(piece.choices[0].text for piece in stream)
            else:
                text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=0).choices[0].text
            answers.append((case, text))
        return answers

    with ThreadPoolExecutor(32) as pool:
        results = [answer for answers in pool.map(one_client, range(32)) for answer in answers]
    assert len(results) == 96
    assert [text for _, text in results] == [expected[case] for case, _ in results]
    assert server.worker.queue_depth == 0 and server.worker.running == 0


def post(server, path, body, **kwargs):
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx2.post(server.url + path, content=content, headers={"content-type": "application/json"}, **kwargs)


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ({"model": MODEL}, "prompt"),
    ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": [5, 300]}, "prompt"),
    ({"prompt": "a", "seed": 2**64}, "seed"),
    ({"prompt": "a", "model": "gpt-4"}, "model"),
])
def test_malformed_completion_bodies_are_400_naming_the_field(server, body, param):
    answer = post(server, "/completions", body)
    assert answer.status_code == (404 if param == "model" else 400)
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
])
def test_malformed_chat_bodies_are_400_naming_the_field(server, body, param):
    answer = post(server, "/chat/completions", body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_null_fields_take_their_defaults(llm, server):
    answer = post(server, "/completions", {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "top_p": None,
                                           "stop": None, "seed": None, "n": None, "stream": None})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == alone(llm, PROMPTS[0], 5)


def test_over_long_prompts_are_refused(client):
    too_long = "prompt of 251 tokens \\+ max_tokens=10 exceeds the context of 256"
    with pytest.raises(openai.BadRequestError, match=too_long) as refused:
        client.completions.create(model=MODEL, prompt="y" * 250, max_tokens=10)
    assert refused.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="messages of 3.. tokens") as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 300}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"


def slowed_steps(worker, monkeypatch, seconds):
    """Decode steps that take at least `seconds` (so a row is still running when its client leaves)."""
    step = worker.batcher.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(worker.batcher, "step", slow_step)


def test_a_client_leaving_mid_stream_cancels_its_row_only(llm, server, client, monkeypatch):
    slowed_steps(server.worker, monkeypatch, 0.01)
    wait_until_idle(server)
    cancelled = finished(server, "cancelled")
    with httpx2.stream("POST", server.url + "/completions", timeout=30,
                      json={"prompt": PROMPTS[2], "max_tokens": 240, "temperature": 0, "stream": True}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                break
    other = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=12, temperature=0)
    assert other.choices[0].text == alone(llm, PROMPTS[5], 12)
    for _ in range(200):
        if finished(server, "cancelled") > cancelled:
            break
        time.sleep(0.05)
    assert finished(server, "cancelled") == cancelled + 1 and server.worker.running == 0, server.worker.finished


@pytest.fixture(scope="module")
def slow_server(llm):
    """One row, one waiting place, a key, a 1 s time limit, and decode steps slowed to 20 ms."""
    settings = ServerSettings(MODEL, max_batch=1, max_len=256, max_queue=1, timeout_s=1.0, api_key="sesame")
    with BackgroundServer(llm, settings) as running, pytest.MonkeyPatch.context() as monkeypatch:
        slowed_steps(running.worker, monkeypatch, 0.02)
        yield running


def test_api_key_is_checked_on_every_request(slow_server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=slow_server.url, api_key="wrong", max_retries=0).models.list()
    assert httpx2.get(slow_server.url.removesuffix("/v1") + "/health").status_code == 401
    keyed = openai.OpenAI(base_url=slow_server.url, api_key="sesame", max_retries=0, timeout=30)
    assert keyed.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_full_queue_is_503_and_slow_requests_time_out(slow_server):
    """One request runs, one waits, the next ones are refused; the two accepted ones hit the 1 s limit."""
    answers = []

    def request():
        answers.append(httpx2.post(slow_server.url + "/completions", timeout=30,
                                  headers={"authorization": "Bearer sesame"},
                                  json={"prompt": "a", "max_tokens": 200, "temperature": 0}))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join()
    codes = sorted(a.status_code for a in answers)
    assert codes == [503, 503, 504, 504]
    busy = next(a for a in answers if a.status_code == 503).json()["error"]
    assert busy["code"] == "queue_full" and busy["type"] == "server_error"


def test_a_plain_request_whose_client_leaves_is_cancelled(slow_server):
    wait_until_idle(slow_server)
    cancelled = finished(slow_server, "cancelled")
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(slow_server.url + "/completions", timeout=0.2, headers={"authorization": "Bearer sesame"},
                    json={"prompt": "a", "max_tokens": 200, "temperature": 0})
    for _ in range(100):
        if finished(slow_server, "cancelled") > cancelled:
            break
        time.sleep(0.05)
    assert finished(slow_server, "cancelled") == cancelled + 1 and slow_server.worker.running == 0, \
        slow_server.worker.finished


@pytest.mark.parametrize("flag, value, named", [("--port", "99999", "expected a TCP port 1-65535, got 99999"),
                                                ("--port", "0", "expected a positive integer, got 0"),
                                                ("--max-batch", "x", "expected a positive integer, got 'x'")])
def test_bad_serve_arguments_are_one_line(capsys, flag, value, named):
    from llmdrop_rt.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["serve", flag, value])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and "\n" not in err and f"argument {flag}: {named}" in err
