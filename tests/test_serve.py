"""`prlhf serve`: the real server on 127.0.0.1 called with the official openai client."""

import contextlib
import json
import re
import shutil
import socket
import threading
import time

import pytest
import torch
from conftest import build_model

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from prlhf.sampling import SamplingParams, generate_rows  # noqa: E402
from prlhf.serve import Server, create_app  # noqa: E402

KEY = "test-key"
MESSAGES = [{"role": "user", "content": "Tell me about the river."}]


def raw_request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a raw request (urllib: no client library between the test and the server)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server, api_key=None):
    """``server`` listening on 127.0.0.1 (a free port) in a thread; yields its URL, stops it after."""
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server, api_key=api_key), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served():
    model = build_model("individual", n_tokens=3, users=("a", "b"))
    model.eval()
    server = Server(model, "tiny", max_tokens_limit=64, max_batch_size=8, batch_wait_ms=20)
    with running(server, api_key=KEY) as url:
        yield url, model, server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_the_served_name_and_health_counts_the_users(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, health = raw_request("GET", served[0] + "/health")
    assert status == 200 and health["status"] == "ok" and health["users"] == 2


def test_greedy_chat_equals_personalized_generate(served, client):
    _, model, _ = served
    for user in ("a", "b", None):
        expected = model.generate([MESSAGES], [user], max_new_tokens=12, do_sample=False)[0]
        kw = {"user": user} if user else {}
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, **kw)
        assert r.choices[0].message.content == expected, user
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        assert r.model_extra["prlhf"]["generic"] is (user is None)


def test_two_users_differ_and_unknown_user_is_generic(served, client):
    kw = dict(model="tiny", prompt="Q: the river\nA:", max_tokens=16, temperature=1.0, seed=3)
    a = client.completions.create(user="a", **kw).choices[0].text
    a_again = client.completions.create(user="a", **kw).choices[0].text
    b = client.completions.create(user="b", **kw).choices[0].text
    assert a == a_again  # same user, same seed: the same sample
    assert a != b
    raw = client.completions.with_raw_response.create(user="stranger", **kw)
    assert raw.headers["x-prlhf-user"] == "generic"
    stranger = raw.parse()
    generic = client.completions.create(**kw)
    assert stranger.choices[0].text == generic.choices[0].text
    assert stranger.model_extra["prlhf"] == {"user": None, "generic": True, "requested_user": "stranger"}
    assert client.completions.with_raw_response.create(user="a", **kw).headers["x-prlhf-user"] == "a"


def test_completions_logprobs_stop_n_and_user_text(served, client):
    _, model, _ = served
    r = client.completions.create(model="tiny", prompt="Q: the sun\nA:", max_tokens=6, temperature=0, logprobs=2, user="a")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    # the greedy token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in c.choices[0].logprobs.content)
    full = client.completions.create(model="tiny", prompt="Q: the sun\nA:", max_tokens=12, temperature=0).choices[0].text
    if len(full) > 4:
        stop = full[2:4]
        cut = client.completions.create(model="tiny", prompt="Q: the sun\nA:", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt="Q: the sun\nA:", max_tokens=8, n=3, seed=1, temperature=1.0)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    text = "I like short answers."
    with_text = client.completions.create(model="tiny", prompt="Q: the sun\nA:", max_tokens=8, temperature=0,
                                          extra_body={"user_text": text})
    expected = model.generate(["Q: the sun\nA:"], [None], [text], max_new_tokens=8, do_sample=False)[0]
    assert with_text.choices[0].text == expected


def test_streaming_gives_the_same_text(served, client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=14, temperature=0, user="b")
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=14, temperature=0, user="b",
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens
    text_stream = client.completions.create(model="tiny", prompt="Q: the moon\nA:", max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in text_stream if c.choices)
    assert streamed == client.completions.create(model="tiny", prompt="Q: the moon\nA:", max_tokens=10,
                                                 temperature=0).choices[0].text


def test_errors_are_openai_shaped_and_the_server_survives(served, client):
    url = served[0]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="over this server's limit"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 2100, max_tokens=8)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, bad = raw_request("POST", url + "/v1/chat/completions", b"{not json", headers)
    assert status == 400 and bad["error"]["code"] == "invalid_json"
    status, typed = raw_request("POST", url + "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "temperature": "hot"}).encode(),
                         headers)
    assert status == 400 and typed["error"]["param"] == "temperature"
    assert raw_request("POST", url + "/v1/chat/completions", json.dumps({"model": "tiny"}).encode(), headers)[0] == 400
    status, missing = raw_request("GET", url + "/v1/nothing", None, headers)
    assert status == 404 and "error" in missing
    # a client that leaves mid-stream: its row is cancelled, and the server keeps serving
    from http.client import HTTPConnection

    host, port = url.removeprefix("http://").split(":")
    conn = HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "Q: a long story\nA:", "max_tokens": 64,
                                                        "temperature": 1.0, "stream": True}), headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()
    ok = client.completions.create(model="tiny", prompt="Q: still there?\nA:", max_tokens=4, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_share_batches_and_keep_their_outputs(served, client):
    _, model, server = served
    prompts = [f"Q: the {w}\nA:" for w in ("river", "lake", "forest", "city", "sun", "moon")]
    users = ["a", "b", None, "a", "b", None]
    expected = [model.generate([p], [u], max_new_tokens=10, do_sample=False)[0] for p, u in zip(prompts, users)]
    before = server.batcher.batches
    results = [None] * len(prompts)

    def call(i):
        kw = {"user": users[i]} if users[i] else {}
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=10, temperature=0, **kw)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.choices[0].text for r in results] == expected
    assert server.batcher.batches - before < len(prompts)  # some requests were decoded together


def test_generate_rows_per_row_settings_and_cancellation():
    model = build_model("individual", n_tokens=2, users=("a", "b"))
    prompts = ["Q: the river\nA:", "Q: the sun\nA:", "Q: the moon\nA:"]
    greedy = model.generate(prompts, ["a", "b", None], max_new_tokens=8, do_sample=False)
    params = [SamplingParams(max_tokens=8, temperature=0), SamplingParams(max_tokens=3, temperature=0),
              SamplingParams(max_tokens=8, temperature=0)]
    calls = {"n": 0}

    def cancel_third():
        calls["n"] += 1
        return calls["n"] > 2

    out = generate_rows(model, prompts, ["a", "b", None], None, params, is_cancelled=[None, None, cancel_third])
    assert out[0].text == greedy[0]
    assert len(out[1].token_ids) <= 3 and greedy[1].startswith(out[1].text)
    assert out[2].finish_reason == "cancelled" and len(out[2].token_ids) <= 2
    torch.manual_seed(0)
    s1 = generate_rows(model, prompts[:1], ["a"], None, [SamplingParams(max_tokens=8, temperature=1.0, seed=5)])[0]
    s2 = generate_rows(model, prompts[:1] * 2, ["a", "b"], None,
                       [SamplingParams(max_tokens=8, temperature=1.0, seed=5), SamplingParams(max_tokens=2, temperature=0)])[0]
    assert s1.token_ids == s2.token_ids  # a row's sample does not depend on its batch mates


def _alone(model, prompt, user, params):
    return generate_rows(model, [prompt], [user], None, [params])[0]


def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone():
    """Continuous batching: rows added between steps (left-padded to the batch's cache, or the batch
    left-padded to theirs) decode exactly as they do alone, greedy and seeded samples alike; a long
    row that leaves early has its cache positions trimmed, and the others go on unchanged."""
    from prlhf.sampling import DecodeBatch

    model = build_model("individual", n_tokens=2, users=("a", "b"))
    model.eval()
    first = [("Q: the river\nA:", "a", SamplingParams(max_tokens=12, temperature=0)),
             ("Q: a much longer question about the open sea and the wind\nA:", "b", SamplingParams(max_tokens=2, temperature=0))]
    later = [("Q: an even longer question, about mountains, rivers, the sea and the stars above them\nA:", None,
              SamplingParams(max_tokens=10, temperature=0)),
             ("Q: hi\nA:", "b", SamplingParams(max_tokens=9, temperature=1.0, seed=3)),
             ("Q: hi\nA:", "a", SamplingParams(max_tokens=0))]
    batch = DecodeBatch(model)
    rows = batch.add(*[list(x) for x in zip(*[(p, u) for p, u, _ in first])], None, [s for *_, s in first])
    for _ in range(3):
        batch.step()
    assert len(batch) == 1  # the long-prompt row left after 2 tokens
    # its longer prompt's positions were trimmed: no column is padding for the row left
    assert batch.mask.shape[1] == batch.cache.get_seq_length() == int(batch.mask[0].sum())
    rows += batch.add([p for p, *_ in later], [u for _, u, _ in later], None, [s for *_, s in later])
    assert rows[-1].out.finish_reason == "length" and rows[-1].out.token_ids == []
    while len(batch):
        batch.step()
    for (prompt, user, params), row in zip(first + later, rows):
        assert row.out.token_ids == _alone(model, prompt, user, params).token_ids, (prompt, user)


def test_a_prompt_for_several_users_is_prefilled_once_before_response():
    from prlhf.sampling import DecodeBatch

    model = build_model("individual", n_tokens=2, users=("a", "b"), user_position="before_response")
    model.eval()
    prompts, users = ["Q: the river\nA:"] * 3 + ["Q: the sun\nA:"], ["a", "b", None, "a"]
    assert "prompt_rows" in model.prepare_prompts(prompts, users, None, share_prompts=None)
    params = [SamplingParams(max_tokens=8, temperature=0) for _ in prompts]
    batch = DecodeBatch(model)
    rows = batch.add(prompts, users, None, params)
    while len(batch):
        batch.step()
    for p, u, s, row in zip(prompts, users, params, rows):
        assert row.out.token_ids == _alone(model, p, u, s).token_ids


def test_the_server_lets_requests_join_a_running_batch(monkeypatch):
    """A request that arrives while another is decoding joins its batch (no wait for the first to end)
    and gets the answer it gets alone."""
    from prlhf.sampling import DecodeBatch

    model = build_model("individual", n_tokens=2, users=("a", "b"))
    model.eval()
    step = DecodeBatch.step

    def slow_step(self):  # a slower model: the first request is surely still decoding when the second comes
        time.sleep(0.01)
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", slow_step)
    server = Server(model, "tiny", max_tokens_limit=64, max_batch_size=8, batch_wait_ms=1)
    with running(server) as url:
        long_body = json.dumps({"model": "tiny", "prompt": "Q: the river\nA:", "user": "a", "max_tokens": 64,
                                "temperature": 0}).encode()
        result = {}
        first = threading.Thread(target=lambda: result.update(long=raw_request(
            "POST", url + "/v1/completions", long_body, {"Content-Type": "application/json"})))
        first.start()
        while server.batcher.rows == 0:
            time.sleep(0.005)
        short = {"model": "tiny", "prompt": "Q: the sun\nA:", "user": "b", "max_tokens": 4, "temperature": 0}
        status, body = raw_request("POST", url + "/v1/completions", json.dumps(short).encode(),
                                   {"Content-Type": "application/json"})
        assert status == 200
        first.join(60)
        assert server.batcher.joined >= 1 and server.batcher.batches == 1
        alone = _alone(model, "Q: the sun\nA:", "b", SamplingParams(max_tokens=4, temperature=0))
        assert body["choices"][0]["text"] == alone.text
        assert result["long"][1]["choices"][0]["text"] == _alone(
            model, "Q: the river\nA:", "a", SamplingParams(max_tokens=64, temperature=0)).text
    server.batcher.close()


def test_the_playground_page_is_served_with_the_users_it_lists(served):
    import urllib.request

    url, model, _ = served
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        html = r.read().decode()
        assert r.headers["content-type"].startswith("text/html")
    assert "prlhf playground" in html and "/v1/completions" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no external assets
    status, users = raw_request("GET", url + "/v1/users", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and users["total"] == 2 and [u["id"] for u in users["data"]] == ["a", "b"]
    assert raw_request("GET", url + "/v1/users")[0] == 401  # the user list is behind the API key


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_the_playground_in_a_headless_browser_shows_each_users_answer(served):
    """The real page in a real browser (Debian's chromium, headless, driven over the DevTools protocol
    through a pipe: tests/cdp.py): it loads, lists the users, and shows side by side each user's
    streamed answer, the one the model gives that user, with the served user under it; two users
    with different embeddings answer differently."""
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser (chromium, chromium-browser or google-chrome on PATH): "
                    "`apt-get install chromium` (.ci/run does) to run the playground's browser test")
    from urllib.parse import urlencode

    from cdp import Browser

    url, model, _ = served
    prompt = "Q: the river\nA:"
    page = url + "/?" + urlencode({"users": "a,b", "prompt": prompt, "max_tokens": 8, "run": 1, "key": KEY})
    browser = Browser(browser)
    try:
        browser.goto(page)
        browser.wait_for("document.body && document.body.dataset.done === '1'", timeout=120)
        options = browser.evaluate("[...document.querySelector('.col select').options].map(o => o.value)")
        answers = browser.evaluate("[...document.querySelectorAll('.answer')].map(a => a.textContent)")
        served_as = browser.evaluate("[...document.querySelectorAll('.served')].map(a => a.textContent)")
    finally:
        browser.close()
    assert options == ["", "a", "b"]  # the generic user, then the model's users
    expected = model.generate([prompt, prompt], ["a", "b"], max_new_tokens=8, do_sample=False)
    assert answers == expected and answers[0] != answers[1]
    assert served_as == ["served as: a", "served as: b"]


# -- prlhf judge ------------------------------------------------------------------------------------

from prlhf.judge import combine, verdict_from_response, win_rates  # noqa: E402


def test_judge_arithmetic_on_hand_made_verdicts():
    assert combine("first", "second") == 1.0  # A preferred in both orders
    assert combine("second", "first") == 0.0
    assert combine("first", "first") == 0.5 and combine("second", "second") == 0.5  # position bias: a tie
    assert combine(None, "first") is None
    r = win_rates([("u1", 1.0), ("u1", 0.5), ("u2", 0.0), ("u2", None), ("u3", 1.0)])
    assert r["n"] == 5 and r["invalid"] == 1 and (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    assert r["win_rate"]["per_sample"] == pytest.approx(2.5 / 4)
    assert r["win_rate"]["per_user"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    lp = lambda top: {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [  # noqa: E731
        {"token": top[0][0], "logprob": top[0][1], "top_logprobs": [{"token": t, "logprob": v} for t, v in top]}]}}]}
    assert verdict_from_response(lp([(" B", -0.2), ("A", -1.9)])) == ("second", "logprobs")
    assert verdict_from_response(lp([("The", -0.1), ("A", -2.0), ("B", -3.0)])) == ("first", "logprobs")
    text = lambda t: {"choices": [{"message": {"content": t}}]}  # noqa: E731
    assert verdict_from_response(text("Response B is better.")) == ("second", "text")
    assert verdict_from_response(text("Both are fine")) == (None, "none")


class _RuleJudge:
    """A judge client with a known rule: answers "A" or "B" for a filled template, no network."""

    def __init__(self, rule):
        self.rule, self.requests, self.seen = rule, 0, []

    def ask(self, text: str) -> dict:
        self.requests += 1
        self.seen.append(text)
        return {"choices": [{"message": {"content": self.rule(text)}}]}


def _rule_generations(tmp_path):
    gens = tmp_path / "generations.jsonl"
    rows = []
    for i, user in enumerate(["a", "a", "b", "c"]):
        prompt = f"Q: question {i}\nA:"
        rows.append({"method": "pdpo", "user_id": user, "prompt": prompt, "response": "Short."})
        rows.append({"method": "dpo", "user_id": user, "prompt": prompt, "response": "A much longer answer with many words."})
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return gens


def test_judge_win_rates_follow_a_known_judge(tmp_path):
    """Pinned against judges whose verdicts are known in advance: one that prefers the shorter
    response (A wins every pair, in both orders), one that always says "A" (position bias: every
    pair a tie), one that prefers the longer (A loses every pair)."""
    from prlhf.judge import judge

    gens = _rule_generations(tmp_path)
    template = tmp_path / "t.txt"
    template.write_text("{prompt}\nFIRST<{response_a}>\nSECOND<{response_b}>")

    def shorter(text):
        first, second = text.split("FIRST<")[1].split(">")[0], text.split("SECOND<")[1].split(">")[0]
        return "A" if len(first) < len(second) else "B"

    for rule, expected in ((shorter, (4, 0, 0, 1.0)), (lambda t: "A", (0, 4, 0, 0.5)),
                           (lambda t: "B" if shorter(t) == "A" else "A", (0, 0, 4, 0.0))):
        client = _RuleJudge(rule)
        r = judge(gens, "pdpo", "dpo", "http://unused", "rule", str(template), client=client)
        assert (r["wins"], r["ties"], r["losses"], r["win_rate"]["per_sample"]) == expected
        assert r["win_rate"]["per_user"] == expected[3] and r["requests"] == 8 == client.requests
        assert sum("FIRST<Short.>" in t for t in client.seen) == 4  # each pair asked in both orders


def test_judge_client_goes_through_openai_and_drops_logprobs_when_refused():
    import importlib
    import importlib.util

    import openai

    from prlhf.judge import JudgeClient

    httpx = importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")  # the openai client's own

    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if "logprobs" in body:
            return httpx.Response(400, json={"error": {"message": "logprobs are not supported", "type": "invalid"}})
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": "B"}}]})

    oa = openai.OpenAI(base_url="http://judge.test/v1", api_key="k", max_retries=0,
                       http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    client = JudgeClient("http://judge.test/v1", "m", client=oa)
    out = client.ask("which?")
    assert out["choices"][0]["message"]["content"] == "B" and client.requests == 2
    assert "logprobs" in bodies[0] and "logprobs" not in bodies[1] and bodies[1]["temperature"] == 0
    client.ask("again")
    assert len(bodies) == 3  # log-probs are not asked for again


def test_judge_end_to_end_against_prlhf_serve(served, tmp_path, capsys):
    from prlhf.cli import main

    gens = tmp_path / "generations.jsonl"
    rows = []
    for i, user in enumerate(["a", "a", "b"]):
        prompt = f"Q: question {i}\nA:"
        rows.append({"method": "pdpo", "user_id": user, "prompt": prompt, "response": "A short answer.", "user_text": "I like short answers."})
        rows.append({"method": "dpo", "user_id": user, "prompt": prompt, "response": "A much longer answer with many words."})
    rows.append({"method": "dpo", "user_id": "c", "prompt": "unpaired", "response": "x"})
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "judge.json"
    args = ["judge", "--generations", str(gens), "--a", "pdpo", "--b", "dpo", "--base-url", served[0] + "/v1",
            "--model", "tiny", "--template", "psoups", "--output", str(out), "--api-key-env", "PRLHF_TEST_JUDGE_KEY"]
    import os

    os.environ["PRLHF_TEST_JUDGE_KEY"] = KEY
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 3 and result["unpaired"]["b_only"] == 1  # user c's generation has no partner
    assert all(x["score"] in (0.0, 0.5, 1.0, None) for x in result["samples"])
    assert result["invalid"] == sum(x["score"] is None for x in result["samples"])
    assert set(result["win_rate"]) == {"per_sample", "per_user"} and result["requests"] == 6
    assert sum(result["verdicts_read_from"].values()) == 6  # every answer read or counted as unreadable
    assert "| judge tiny (psoups) | 3 |" in capsys.readouterr().out
    assert main(args) == 0  # a rerun reads every judgment from the cache
    again = json.loads(out.read_text())
    assert again["requests"] == 0 and again["cached_judgments"] == 6 and again["win_rate"] == result["win_rate"]
    assert main(["judge", "--show-template", "psoups"]) == 0
    assert "{user_profile}" in capsys.readouterr().out
    own = tmp_path / "mine.txt"
    own.write_text("Which is better for {user_profile}? {prompt} A: {response_a} B: {response_b}")
    assert main(args[:-6] + ["--template", str(own), "--output", str(tmp_path / "j2.json"), "--api-key-env",
                             "PRLHF_TEST_JUDGE_KEY"]) == 0
    assert json.loads((tmp_path / "j2.json").read_text())["requests"] == 6  # another template: judged afresh
    bad = args[:]
    bad[bad.index("pdpo")] = "nosuch"
    assert main(bad) == 2 and "no generations of method 'nosuch'" in capsys.readouterr().err


def test_prompt_embeds_for_vllm_equal_what_generation_feeds_the_model():
    model = build_model("individual", n_tokens=3, users=("a", "b"))
    prompts, users = ["Q: the river\nA:", "Q: a much longer question about the sea\nA:"], ["a", None]
    batch = model.prepare_prompts(prompts, users, ["I like short answers.", None])
    fed = model.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])  # left-padded, as generate() sees it
    for i in range(2):
        mine = model.prompt_embeds(prompts[i], users[i], ["I like short answers.", None][i])
        assert torch.equal(mine, fed[i][batch["attention_mask"][i].bool()])
    # the same tensor as inputs_embeds (positions from 0) gives the same next-token logits as our generation
    one = model.prompt_embeds(prompts[0], "a", "I like short answers.")
    with torch.no_grad():
        direct = model.llm(inputs_embeds=one[None]).logits[0, -1]
        ours = model.llm(inputs_embeds=fed[:1], attention_mask=batch["attention_mask"][:1],
                         position_ids=(batch["attention_mask"][:1].cumsum(-1) - 1).clamp(min=0)).logits[0, -1]
    assert torch.allclose(direct, ours, atol=1e-5)
