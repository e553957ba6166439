"""The server with its engines in a process of their own (serve/engine_process.py, the command line's default):
answers equal to the one-process server's and to transformers' ``generate``, a departed client stops its
decoding in the child, and a child that dies or a server that dies leaves nothing hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from serve.engine import load_served
from serve.engine_process import start_served
from serve.server import create_app
from tests.test_serve import completions_at_once, serving

PROMPTS = ["def add(a, b):\n", "import os\n", "class Stack:\n", "x = [", "for i in", "# a", "if x", "y = {"]


@pytest.fixture(scope="module")
def apart(hf_models, tmp_path_factory):
    """An HF Llama folder served with its engines in a child process (and the same folder in this process)."""
    folder = str(hf_models["llama"])
    served = start_served(folder, ["torch"], "cpu", 120, tmp_path_factory.mktemp("a"), max_batch=8, threads=1)
    here = load_served(folder, ["torch"], "cpu", 120, tmp_path_factory.mktemp("b"), max_batch=8)
    try:
        with serving(create_app(served)) as url, serving(create_app(here)) as url_here:
            yield served, url, here, url_here
    finally:
        served.process.close()


def _post(url, body):
    body = {"model": "llama", "temperature": 0} | body
    r = httpx.post(url + "/v1/completions", json=body, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def _streamed(url, body) -> tuple[str, dict]:
    body = {"model": "llama", "temperature": 0, "stream": True} | body
    text, last = "", None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120, trust_env=False) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                text += "".join(c["text"] for c in last["choices"])
    return text, last


def test_concurrent_requests_decode_together_in_the_child_as_transformers_generate(apart):
    served, url, here, _ = apart
    hf, tok = here.ev.model.hf, here.ev.tokenizer

    body = {"model": "llama", "max_tokens": 12, "temperature": 0}
    answers = completions_at_once(url, [body | {"prompt": p} for p in PROMPTS])
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = tok.encode(prompt)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id)
        new = out[0, len(ids) :].tolist()
        new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
        assert answer["choices"][0]["text"] == tok.decode(new), prompt
    state = served.process.status()
    assert state["engines"]["torch"]["largest_batch"] >= 4 and state["engines"]["torch"]["running"] == 0
    health = httpx.get(url + "/health", trust_env=False).json()
    assert health["engine_process"] == {"pid": served.process.process.pid, "state": "running"}
    assert health["engines"] == httpx.get(apart[3] + "/health", trust_env=False).json()["engines"]
    assert health["max_seq_len"] == 128 and health["threads"] == 1
    assert health["process_cpu_s"] > state["cpu_s"]  # the child's CPU seconds count as the server's
    assert httpx.get(url + "/energy", trust_env=False).json()["method"] == "unavailable"  # no counter here


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "def add(a, b):\n", "max_tokens": 10, "logprobs": 2},
        {"prompt": ["import os\n", "x = ["], "max_tokens": 9, "temperature": 0.9, "top_k": 20, "seed": 7, "n": 2},
        {"prompt": "class Stack:\n", "max_tokens": 30, "stop": ["\n", "e"], "temperature": 1.0, "seed": 3},
    ],
)
def test_the_child_answers_as_the_one_process_server(apart, body):
    """Greedy with log-probabilities, seeded top-k sampling over several prompts and choices, stop strings:
    whole and streamed, the same text, finish reasons and log-probabilities as the engines in the server's own
    process."""
    _, url, _, url_here = apart
    a, b = _post(url, body), _post(url_here, body)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["finish_reason"] for c in a["choices"]] == [c["finish_reason"] for c in b["choices"]]
    for x, y in zip(a["choices"], b["choices"], strict=True):
        if x["logprobs"] is not None:
            assert x["logprobs"]["tokens"] == y["logprobs"]["tokens"]
            assert x["logprobs"]["token_logprobs"] == pytest.approx(y["logprobs"]["token_logprobs"], abs=1e-5)
    if body.get("n", 1) == 1 and isinstance(body["prompt"], str):
        text, last = _streamed(url, body)
        assert text == a["choices"][0]["text"] and last["tokens_out"] == a["tokens_out"]


def test_a_client_that_leaves_stops_its_decoding_in_the_child(apart):
    """A stream abandoned at its first chunk: the child stops its 8 sequences before their 120 tokens (quiet,
    within a few steps; the bound leaves room for a loaded machine, where both processes slow together), and
    the next request is served."""
    served, url, _, _ = apart
    before = served.process.status()["engines"]["torch"]["decoded"]
    body = {"model": "llama", "prompt": "x = [", "max_tokens": 120, "n": 8, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60, trust_env=False) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk, then the client goes away
    deadline = time.monotonic() + 10
    while served.process.status()["engines"]["torch"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    decoded = served.process.status()["engines"]["torch"]["decoded"] - before
    assert 0 < decoded < 8 * 120, decoded  # ignore_eos: all 960 had the cancel not stopped them
    assert _post(url, {"prompt": "import os\n", "max_tokens": 4})["tokens_out"] > 0


def test_a_child_that_dies_fails_its_requests_with_503_in_one_line_and_health_says_so(hf_models, tmp_path, monkeypatch):
    """A stopped child: /health says it does not answer (and answers itself); a killed one: 503 in one line
    naming its exit code, and /health says it ended."""
    from serve import engine_process

    monkeypatch.setattr(engine_process, "STATUS_TIMEOUT_S", 0.5)
    served = start_served(str(hf_models["llama"]), ["torch"], "cpu", 16, tmp_path, max_batch=4, threads=1)
    try:
        with serving(create_app(served)) as url:
            assert _post(url, {"prompt": "import os\n", "max_tokens": 3})["tokens_out"] > 0
            os.kill(served.process.process.pid, signal.SIGSTOP)
            try:
                health = httpx.get(url + "/health", trust_env=False, timeout=30).json()
                assert health["engine_process"]["state"] == "not answering", health["engine_process"]
            finally:
                os.kill(served.process.process.pid, signal.SIGCONT)
            health = httpx.get(url + "/health", trust_env=False, timeout=30).json()
            assert health["engine_process"]["state"] == "running"
            os.kill(served.process.process.pid, signal.SIGKILL)
            served.process.process.wait(10)
            r = httpx.post(url + "/v1/completions", json={"model": "llama", "prompt": "x", "max_tokens": 3})
            assert r.status_code == 503
            message = r.json()["error"]["message"]
            assert "engine process ended (exit code -9)" in message and "\n" not in message
            health = httpx.get(url + "/health", trust_env=False).json()
            assert health["engine_process"]["state"] == "ended" and "exit code -9" in health["engine_process"]["why"]
    finally:
        served.process.close()


def test_a_child_that_cannot_start_raises_the_childs_error_here(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        start_served(str(tmp_path / "nothing"), ["torch"], "cpu", 16, tmp_path, threads=1)


def test_the_child_leaves_when_the_server_is_killed(hf_models, tmp_path):
    """kill -9 of the server: its engine process sees the pipe close and exits (no orphan holds the model)."""
    from serve.launch import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "serve.server", str(hf_models["llama"]), "--engines", "torch", "--port", str(port)]
    cmd += ["--threads", "1", "--max-tokens-limit", "16", "--workdir", str(tmp_path)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None:
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        child = health["engine_process"]["pid"]
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 15
        while _alive(child):
            assert time.monotonic() < deadline, "the engine process outlived its server"
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by init, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_this_projects_checkpoint_is_served_apart_as_here(trained_checkpoint, tmp_path):
    """A checkpoint of this project (per-head layers, its SentencePiece tokenizer) through the engine process:
    /health and the answers (greedy, streamed, a stop string) as the engines in the server's own process."""
    ckpt = str(trained_checkpoint)
    served = start_served(ckpt, ["torch"], "cpu", 16, tmp_path / "a", max_batch=4, threads=1)
    here = load_served(ckpt, ["torch"], "cpu", 16, tmp_path / "b", max_batch=4)
    try:
        with serving(create_app(served)) as url, serving(create_app(here)) as url_here:
            a, b = (httpx.get(u + "/health", trust_env=False).json() for u in (url, url_here))
            same = ("model", "models", "architecture", "engines", "max_batch", "max_seq_len", "max_tokens_limit")
            same += ("energy",)
            assert {k: a[k] for k in same} == {k: b[k] for k in same} and a["architecture"] == "perhead-llama"
            for body in ({"prompt": "def add(a, b):\n", "max_tokens": 12}, {"prompt": "import", "stop": ["\n"]}):
                body = body | {"model": "t"}
                assert _post(url, body)["choices"] == _post(url_here, body)["choices"]
                assert _streamed(url, body)[0] == _post(url_here, body)["choices"][0]["text"]
    finally:
        served.process.close()
