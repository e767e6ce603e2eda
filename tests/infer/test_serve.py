"""`llama-lora serve` as a real subprocess on a loopback port, spoken to with the official `openai` client:
the server's greedy answers are `infer`'s, streaming joins to the same text, adapters are chosen by `model`,
16 concurrent clients are all served, and every bad request gets its OpenAI-style error."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from llama_lora.config import load_config
from llama_lora.data import encoding, tool_calls
from llama_lora.infer import generate, loading
from llama_lora.train.loop import train
from tests.conftest import cli_in_process, tiny_overrides

KEY = "sk-test-9f2c1e"  # what the first server requires; it must never appear in its log
PROMPTS = ["Say something.", "What now?"]
N_NEW = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two tiny LoRA runs on the same base, trained on different answers, so they answer differently."""
    root = tmp_path_factory.mktemp("serve-runs")
    made = {}
    for name, answer in (("fruit", "apple banana cherry"), ("greet", "hello hello friend")):
        rows = [{"instruction": f"Question {i}?", "input": "", "output": answer} for i in range(24)]
        source = root / f"{name}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
        extra = {"train.max_steps": 10, "train.learning_rate": 1e-2}
        train(load_config(overrides=tiny_overrides(tiny_model_dir, source, root / name, **extra)), quiet=True)
        made[name] = root / name
    return made


def start_server(args: list[str], log: Path, env: dict | None = None, precision: str = "fp32"):
    """A server in float32 unless asked (its greedy answers are then `infer --precision fp32`'s on any CPU;
    `auto` would be bf16 on some machines and float32 on others)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_lora", "serve", *args, "--port", str(port), "--precision", precision],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        env={**os.environ, **(env or {})},
    )
    url, key = f"http://127.0.0.1:{port}/v1", (env or {}).get("LLAMA_LORA_API_KEY", "")
    if "--api-key" in args:
        key = args[args.index("--api-key") + 1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()}")
        try:
            if requests.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).ok:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"the server was not ready within 120 s: {log.read_text()}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """Base + two adapters on it, the API key from LLAMA_LORA_API_KEY."""
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    args = ["--adapter", f"fruit={runs['fruit']}", "--adapter", f"greet={runs['greet']}"]
    proc, url = start_server(args, log, env={"LLAMA_LORA_API_KEY": KEY})
    try:
        yield url, log
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


def infer_answers(runs, tiny_model_dir, precision: str):
    """`infer --greedy --precision P`'s answers, in process: {(model, prompt): text}, and the loaded models."""
    quiet = dict(device="cpu", log=lambda *a: None, precision=precision)
    loaded = {
        "base": loading.load(base=str(tiny_model_dir), **quiet),
        "fruit": loading.load(adapter=str(runs["fruit"]), **quiet),
        "greet": loading.load(adapter=str(runs["greet"]), **quiet),
    }
    settings = generate.GenerationSettings(max_new_tokens=N_NEW)
    texts = {
        (name, p): generate.generate(lo, [{"role": "user", "content": p}], settings).text
        for name, lo in loaded.items()
        for p in PROMPTS
    }
    return texts, loaded


@pytest.fixture(scope="module")
def expected(runs, tiny_model_dir):
    """`infer --greedy --precision fp32`'s answers (what the float32 servers must give)."""
    return infer_answers(runs, tiny_model_dir, "fp32")


def model_id(client, name: str) -> str:
    return (
        next(m.id for m in client.models.list().data if m.id not in ("fruit", "greet"))
        if name == "base"
        else name
    )


def chat(client, name: str, prompt: str, **kwargs):
    return client.chat.completions.create(
        model=model_id(client, name),
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=N_NEW,
        **kwargs,
    )


def test_models_lists_the_base_and_each_adapter(client, tiny_model_dir):
    assert sorted(m.id for m in client.models.list().data) == sorted([str(tiny_model_dir), "fruit", "greet"])


def test_models_name_their_parent_and_root(server, runs, tiny_model_dir):
    """vLLM's fields: an adapter's `parent` is the base, its `root` its directory; the base is its own root."""
    rows = requests.get(f"{server[0]}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    by_id = {row["id"]: row for row in rows["data"]}
    base = str(tiny_model_dir)
    assert by_id[base]["parent"] is None and by_id[base]["root"] == base
    for name in ("fruit", "greet"):
        assert by_id[name]["parent"] == base
        assert Path(by_id[name]["root"]).resolve() == (runs[name] / "adapter").resolve()


def test_health_answers_without_a_key(server):
    root = server[0].removesuffix("/v1")
    assert requests.get(f"{root}/health", timeout=10).status_code == 200


def test_base_colon_adapter_names_the_adapter(client, expected, tiny_model_dir):
    """SGLang's `base:adapter` form: the adapter's answer; an unknown adapter is a 404 like any name."""
    texts, _ = expected
    reply = client.chat.completions.create(
        model=f"{tiny_model_dir}:fruit",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        temperature=0,
        max_tokens=N_NEW,
    )
    assert reply.choices[0].message.content == texts[("fruit", PROMPTS[0])]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=f"{tiny_model_dir}:nope", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )


def test_metrics_count_requests_tokens_and_first_tokens(server, client):
    root = server[0].removesuffix("/v1")

    def scrape() -> dict[str, float]:
        text = requests.get(f"{root}/metrics", timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    before = scrape()
    reply = chat(client, "fruit", PROMPTS[1])
    after = scrape()
    ok = 'llama_lora_requests_total{status="200"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after["llama_lora_generation_tokens_total"] - before["llama_lora_generation_tokens_total"] == (
        reply.usage.completion_tokens
    )
    assert after["llama_lora_prompt_tokens_total"] - before["llama_lora_prompt_tokens_total"] == (
        reply.usage.prompt_tokens
    )
    count = "llama_lora_time_to_first_token_seconds_count"
    assert after[count] == before[count] + 1
    assert after["llama_lora_num_requests_running"] == 0 and after["llama_lora_num_requests_waiting"] == 0


@pytest.mark.parametrize("name", ["base", "fruit", "greet"])
def test_greedy_chat_equals_infer(client, expected, name):
    texts, loaded = expected
    reply = chat(client, name, PROMPTS[0])
    assert reply.choices[0].message.content == texts[(name, PROMPTS[0])]
    ids = generate.render_prompt(loaded[name], [{"role": "user", "content": PROMPTS[0]}])
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_adapters_answer_differently(expected):
    texts, _ = expected
    assert len({texts[(name, PROMPTS[0])] for name in ("base", "fruit", "greet")}) == 3


def test_streamed_chunks_join_to_the_same_text(client, expected):
    texts, _ = expected
    pieces, usage = [], None
    for chunk in chat(client, "fruit", PROMPTS[1], stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(pieces) == texts[("fruit", PROMPTS[1])]
    assert usage is not None and usage.completion_tokens > 0


def test_completions_take_plain_text(client, expected):
    loaded = expected[1]["greet"]
    ids = encoding.tokenize([("Once upon", False)], loaded.tokenizer).input_ids
    want = generate.generate_ids(loaded, ids, generate.GenerationSettings(max_new_tokens=N_NEW)).text
    got = client.completions.create(model="greet", prompt="Once upon", temperature=0, max_tokens=N_NEW)
    assert got.choices[0].text == want and got.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(
        model="greet", prompt="Once upon", temperature=0, max_tokens=N_NEW, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_stop_strings_cut_the_text(client, expected):
    text = expected[0][("greet", PROMPTS[0])]
    stop = "friend"
    assert text.find(stop) > 0, text
    reply = chat(client, "greet", PROMPTS[0], stop=["never there", stop])
    assert reply.choices[0].message.content == text[: text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    pieces = chat(client, "greet", PROMPTS[0], stop="frie", stream=True)  # held back, then cut
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == text[: text.find(stop)]


def test_tools_are_rendered_as_training_renders_them(client, expected):
    tools = [
        {"type": "function", "function": {"name": "get_time", "description": "The time.", "parameters": {}}}
    ]
    loaded = expected[1]["fruit"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    with_tools = generate.render_prompt(
        dataclasses.replace(loaded, tools=tool_calls.parse_tools(tools)), messages
    )
    assert with_tools != generate.render_prompt(loaded, messages)
    reply = chat(client, "fruit", PROMPTS[0], tools=tools)
    assert reply.usage.prompt_tokens == len(with_tools)


def test_sixteen_concurrent_clients_all_get_their_answers(server, client, expected):
    texts, _ = expected
    names = ["base", "fruit", "greet"]
    jobs = [(names[i % 3], PROMPTS[i % 2]) for i in range(16)]
    results: dict[int, str] = {}
    base_id = model_id(client, "base")

    def ask(i: int) -> None:
        own = openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)
        name, prompt = jobs[i]
        reply = own.chat.completions.create(
            model=base_id if name == "base" else name,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=N_NEW,
        )
        results[i] = reply.choices[0].message.content

    start = time.monotonic()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert time.monotonic() - start < 120
    assert {i: results.get(i) for i in range(16)} == {i: texts[jobs[i]] for i in range(16)}
    assert len(client.models.list().data) == 3  # still healthy


def test_a_client_that_disconnects_stops_its_generation(server, client):
    url, log = server
    stream = client.chat.completions.create(
        model=model_id(client, "base"),
        messages=[{"role": "user", "content": "Go on forever."}],
        temperature=0,
        max_tokens=1500,
        stream=True,
    )
    for n, _ in enumerate(stream):
        if n == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "cancelled" not in log.read_text():
        time.sleep(0.2)
    line = next(x for x in log.read_text().splitlines() if "cancelled" in x)
    assert int(re.search(r"completion_tokens=(\d+)", line).group(1)) < 1500
    assert chat(client, "fruit", PROMPTS[0]).choices[0].message.content  # served after it


def test_bad_requests_get_openai_errors(server, client):
    url = server[0]
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat_url = f"{url}/chat/completions"

    def error(response, status: int) -> dict:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    error(requests.post(chat_url, data="{not json", headers=auth, timeout=30), 400)
    no_messages = {"model": "fruit", "messages": []}
    assert (
        error(requests.post(chat_url, json=no_messages, headers=auth, timeout=30), 400)["param"] == "messages"
    )
    error(requests.post(chat_url, data=b"x" * ((1 << 20) + 1), headers=auth, timeout=30), 413)
    wrong_key = {"Authorization": "Bearer nope"}
    error(requests.post(chat_url, json=no_messages, headers=wrong_key, timeout=30), 401)
    error(requests.get(f"{url}/models", timeout=30), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-model", PROMPTS[0])
    for bad in ({"temperature": -1}, {"max_tokens": 0}, {"top_p": 2}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="fruit", messages=[{"role": "user", "content": "hi"}], **bad)
    with pytest.raises(openai.BadRequestError, match="context"):
        chat(client, "fruit", "hello " * 3000)
    assert len(client.models.list().data) == 3


def test_one_log_line_per_request_and_never_the_key(server, client):
    log = server[1]
    before = log.read_text().count("serve: /v1/chat/completions")
    chat(client, "greet", PROMPTS[0])
    text = log.read_text()
    assert text.count("serve: /v1/chat/completions") == before + 1
    assert re.search(r"model=greet status=200 prompt_tokens=\d+ completion_tokens=\d+ time=", text)
    assert KEY not in text and "Traceback" not in text


def test_positional_run_dir_is_served_under_its_name(runs, expected, tmp_path):
    proc, url = start_server([str(runs["fruit"]), "--api-key", "k2"], tmp_path / "log.txt")
    try:
        other = openai.OpenAI(base_url=url, api_key="k2", max_retries=0, timeout=60)
        assert "fruit" in [m.id for m in other.models.list().data]
        reply = chat(other, "fruit", PROMPTS[1])
        assert reply.choices[0].message.content == expected[0][("fruit", PROMPTS[1])]
    finally:
        stop_server(proc)
    assert "k2" not in (tmp_path / "log.txt").read_text()


def test_a_full_waiting_queue_answers_503_with_retry_after(runs, tmp_path):
    """One sequence decoding, one waiting (--max-sequences 1 --max-waiting 1): a third request gets 503 with
    Retry-After; once the first client goes away the waiting one is served."""
    proc, url = start_server(
        [str(runs["fruit"]), "--max-sequences", "1", "--max-waiting", "1"], tmp_path / "log"
    )
    root = url.removesuffix("/v1")

    def body(tokens: int, stream: bool = False) -> dict:
        messages = [{"role": "user", "content": "Go on."}]
        return {
            "model": "fruit",
            "messages": messages,
            "max_tokens": tokens,
            "temperature": 0,
            "stream": stream,
        }

    def waiting() -> float:
        text = requests.get(f"{root}/metrics", timeout=10).text
        return float(re.search(r"^llama_lora_num_requests_waiting (\S+)$", text, re.M).group(1))

    try:
        first = requests.post(
            f"{url}/chat/completions", json=body(1500, stream=True), stream=True, timeout=60
        )
        lines = first.iter_lines()
        next(line for line in lines if line)  # it is decoding
        second: dict = {}
        waiter = threading.Thread(
            target=lambda: second.update(
                r=requests.post(f"{url}/chat/completions", json=body(4), timeout=120)
            )
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        third = requests.post(f"{url}/chat/completions", json=body(4), timeout=60)
        assert third.status_code == 503 and third.headers["Retry-After"] == "1"
        assert third.json()["error"]["type"] == "server_error" and "busy" in third.json()["error"]["message"]
        first.close()
        waiter.join(120)
        assert second["r"].status_code == 200 and second["r"].json()["choices"][0]["message"]["content"]
    finally:
        stop_server(proc)


def adapter_of_another_base(run: Path, copy: Path) -> Path:
    """A copy of `run` whose stored base fingerprint is another model's."""
    shutil.copytree(run, copy)
    meta_file = copy / "adapter" / "llama_lora.json"
    meta = json.loads(meta_file.read_text())
    meta["base_fingerprint"]["embedding_sample"] = [1.0] * len(meta["base_fingerprint"]["embedding_sample"])
    meta_file.write_text(json.dumps(meta))
    return copy


def test_serve_refuses_adapters_of_different_bases(runs, tmp_path):
    other = adapter_of_another_base(runs["greet"], tmp_path / "other")
    code, _, err = cli_in_process(
        "serve", "--adapter", f"a={runs['fruit']}", "--adapter", f"b={other}", "--port", str(free_port())
    )
    assert code == 2 and "trained on" in err and len(err.strip().splitlines()) == 1, err
    for args in ([], ["--adapter", "no-equals-sign"], [str(runs["fruit"]), "--port", "0"]):
        code, _, err = cli_in_process("serve", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_adapters_loaded_and_unloaded_at_run_time(runs, expected, tiny_model_dir, tmp_path):
    """vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter on a server started with the base alone:
    a loaded adapter answers as `infer` does (by name and as base:adapter, streamed too) while the base keeps
    its own answers; the API key applies; a name served already, a missing path and an adapter of another
    base (fingerprint) are refused in one JSON error; an unload waits for the adapter's running request and
    the name answers 404 at once."""
    other = adapter_of_another_base(runs["greet"], tmp_path / "other")
    log = tmp_path / "log"
    proc, url = start_server([str(tiny_model_dir), "--allow-adapter-updates", "--api-key", "k3"], log)
    auth = {"Authorization": "Bearer k3"}
    texts = expected[0]

    def post(path: str, body: dict, headers=auth) -> requests.Response:
        return requests.post(f"{url}/{path}", json=body, headers=headers, timeout=120)

    try:
        client = openai.OpenAI(base_url=url, api_key="k3", max_retries=0, timeout=120)
        base = client.models.list().data[0].id
        assert (
            post("load_lora_adapter", {"lora_name": "fruit", "lora_path": str(runs["fruit"])}, {}).status_code
            == 401
        )
        loaded = post("load_lora_adapter", {"lora_name": "fruit", "lora_path": str(runs["fruit"])})
        assert loaded.status_code == 200 and "fruit" in loaded.text
        assert post("load_lora_adapter", {"lora_name": "greet", "lora_path": str(runs["greet"])}).ok
        rows = {m["id"]: m for m in requests.get(f"{url}/models", headers=auth, timeout=10).json()["data"]}
        assert rows["fruit"]["parent"] == base and rows["fruit"]["root"] == str(runs["fruit"] / "adapter")
        for name, model in (("fruit", "fruit"), ("greet", f"{base}:greet"), ("base", base)):
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[0]}],
                temperature=0,
                max_tokens=N_NEW,
            )
            assert reply.choices[0].message.content == texts[(name, PROMPTS[0])], name
        pieces = client.chat.completions.create(
            model=f"{base}:fruit",
            messages=[{"role": "user", "content": PROMPTS[1]}],
            temperature=0,
            max_tokens=N_NEW,
            stream=True,
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
            == texts[("fruit", PROMPTS[1])]
        )

        for body, status, words in (
            ({"lora_name": "fruit", "lora_path": str(runs["greet"])}, 400, "already served"),
            ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 400, "neither a run directory"),
            ({"lora_name": "x", "lora_path": str(other)}, 400, "trained on"),
            ({"lora_name": "x"}, 400, "lora_path"),
        ):
            refused = post("load_lora_adapter", body)
            error = refused.json()["error"]
            assert refused.status_code == status and words in error["message"], (body, refused.text)
        assert "x" not in [m.id for m in client.models.list().data]

        stream = requests.post(
            f"{url}/chat/completions",
            json={
                "model": "greet",
                "messages": [{"role": "user", "content": "Go on."}],
                "max_tokens": 1500,
                "temperature": 0,
                "stream": True,
            },
            headers=auth,
            stream=True,
            timeout=60,
        )
        lines = stream.iter_lines()
        next(line for line in lines if line)  # greet is decoding
        unloaded: dict = {}
        waiter = threading.Thread(
            target=lambda: unloaded.update(r=post("unload_lora_adapter", {"lora_name": "greet"}))
        )
        waiter.start()
        time.sleep(1.0)
        assert waiter.is_alive()  # the running request holds the adapter
        gone = post("chat/completions", {"model": "greet", "messages": [{"role": "user", "content": "Hi"}]})
        assert gone.status_code == 404  # but the name answers no new request
        stream.close()
        waiter.join(60)
        assert unloaded["r"].status_code == 200, unloaded["r"].text
        assert post("unload_lora_adapter", {"lora_name": "greet"}).status_code == 404
        assert post("unload_lora_adapter", {"lora_name": base}).status_code == 400
        assert [m.id for m in client.models.list().data] == [base, "fruit"]
        reply = chat(client, "fruit", PROMPTS[1])
        assert reply.choices[0].message.content == texts[("fruit", PROMPTS[1])]
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "loaded adapter fruit" in text and "unloaded adapter greet" in text and "k3" not in text


def test_adapter_updates_are_refused_unless_allowed(server):
    url, _ = server
    for path in ("load_lora_adapter", "unload_lora_adapter"):
        refused = requests.post(
            f"{url}/{path}",
            json={"lora_name": "fruit", "lora_path": "/tmp"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )
        assert refused.status_code == 403 and "--allow-adapter-updates" in refused.json()["error"]["message"]


def test_a_bf16_server_answers_as_infer_does_in_bf16(runs, tiny_model_dir, tmp_path):
    """With --precision bf16 each served name decodes on bf16 copies with its adapter folded in (one set per
    name, a run-time loaded adapter's too): greedy answers equal `infer --precision bf16`'s, alone, streamed
    and with two adapters asked at once."""
    texts, _ = infer_answers(runs, tiny_model_dir, "bf16")
    args = [str(tiny_model_dir), "--adapter", f"greet={runs['greet']}", "--allow-adapter-updates"]
    proc, url = start_server(args, tmp_path / "log", precision="bf16")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        body = {"lora_name": "fruit", "lora_path": str(runs["fruit"])}
        assert requests.post(f"{url}/load_lora_adapter", json=body, timeout=120).ok
        for name in ("base", "fruit", "greet"):
            for prompt in PROMPTS:
                assert chat(client, name, prompt).choices[0].message.content == texts[(name, prompt)]
        pieces = chat(client, "fruit", PROMPTS[1], stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
            == texts[("fruit", PROMPTS[1])]
        )
        together: dict[str, str] = {}

        def ask(name: str) -> None:
            together[name] = chat(client, name, PROMPTS[0]).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(n,)) for n in ("fruit", "greet")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == {n: texts[(n, PROMPTS[0])] for n in ("fruit", "greet")}
        assert texts[("fruit", PROMPTS[0])] != texts[("greet", PROMPTS[0])]
    finally:
        stop_server(proc)
    assert "; bf16; adapters may be loaded" in (tmp_path / "log").read_text()
