"""The HTTP server and the load client, over real HTTP on 127.0.0.1 (a free port chosen in the test)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llama.generation import generate
from runtime.decoding import DECODE_ENGINES
from serve.server import create_app, create_server, load_served

PROMPT = "def add(a, b):\n"


def _start(app, request_timeout_s: float = 10.0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server(app, "127.0.0.1", port, request_timeout_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(trained_checkpoint, tmp_path_factory):
    return load_served(str(trained_checkpoint), list(DECODE_ENGINES), "cpu", 48, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def url(served):
    server, thread, url = _start(create_app(served))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def post(url, body, **kw):
    return httpx.post(url + "/v1/completions", json=body, timeout=120, trust_env=False, **kw)


def eager(served, prompt: str, n: int) -> str:
    tok = served.ev.tokenizer
    return tok.decode(generate(served.ev.model, [tok.encode(prompt)], n, eos_id=tok.eos_id)[0])


def test_health_lists_every_engine(url):
    h = httpx.get(url + "/health", trust_env=False).json()
    assert set(h["engines"]) == set(DECODE_ENGINES) and h["unavailable"] == {}
    assert h["energy"].startswith("unavailable") or h["energy"] in ("rapl", "nvml-energy-counter")


@pytest.mark.parametrize("engine", DECODE_ENGINES)
def test_each_engine_completes_as_eager_greedy_generation(served, url, engine):
    r = post(url, {"prompt": PROMPT, "max_tokens": 20, "engine": engine})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["engine"] == engine and d["completion"] == eager(served, PROMPT, 20)
    n = d["tokens_out"]
    assert d["tokens_in"] == len(served.ev.tokenizer.encode(PROMPT)) and 0 < n <= 20
    assert len(d["itl_ms"]) == n - 1 and 0 < d["ttft_ms"] <= d["e2e_ms"]
    assert d["tpot_ms"] == pytest.approx((d["e2e_ms"] - d["ttft_ms"]) / (n - 1))
    assert d["tpot_ms"] == pytest.approx(sum(d["itl_ms"]) / (n - 1))
    e = d["energy"]
    assert e["method"] == "unavailable" and e["reason"] or e.get("energy_j") is None or e["energy_j"] > 0


def test_bad_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(served, url):
    raw = httpx.post(
        url + "/v1/completions",
        content=b'{"prompt": "x',
        headers={"content-type": "application/json"},
        trust_env=False,
    )
    assert raw.status_code == 400 and raw.json() == {"error": "the request body is not valid JSON"}
    limit = f"over this server's limit of {served.max_tokens_limit}"  # 48 asked, capped at the context - 1
    cases = [
        ({"prompt": "", "max_tokens": 4}, 400, "prompt: String should have at least 1 character"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens: Input should be greater than 0"),
        ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 49}, 400, limit),
        ({"prompt": "x", "max_tokens": 10**30}, 400, limit),
        ({"prompt": "x", "engine": "tensorrt"}, 400, "engine 'tensorrt' is not served; use one of: torch"),
        ({"prompt": "x " * 5000, "max_tokens": 8}, 413, "at most"),
        ({"max_tokens": 8}, 400, "prompt: Field required"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        # seeds beyond torch.Generator's 64-bit range used to overflow into a 500
        ({"prompt": "x", "seed": 2**64}, 400, "seed"),
        ({"prompt": "x", "seed": 10**30}, 400, "seed"),
        ({"prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
    ]
    for body, status, message in cases:
        r = post(url, body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"], (body, r.text)
    ok = post(url, {"prompt": PROMPT, "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["completion"] == eager(served, PROMPT, 5)


def test_a_burst_of_concurrent_requests_is_all_answered(served, url):
    engines = list(DECODE_ENGINES)
    bodies = [{"prompt": PROMPT, "max_tokens": 6, "engine": engines[i % len(engines)], "seed": i} for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda b: post(url, b), bodies))
    assert [a.status_code for a in answers] == [200] * 24
    expected = eager(served, PROMPT, 6)
    assert all(a.json()["completion"] == expected for a in answers)  # none lost, none mixed up
    assert max(a.json()["queue_ms"] for a in answers) > 0  # they queued: served one at a time


def test_load_client_writes_requests_summary_statistics_and_report(url, tmp_path):
    from serve.client import run_load
    from visualizations.serving import write_serving_report

    prompts = ["def f(x):\n", "import os\n", "class A:\n"]
    s = run_load(url, ["torch", "onnxruntime"], 12, 3, 8, tmp_path, prompts, progress=False)
    assert s["ok"] == 12 and s["requests_per_s"] > 0
    assert all(e["prompts_truncated"] == 0 for e in s["engines"].values())
    for engine in ("torch", "onnxruntime"):
        e = s["engines"][engine]
        assert e["ok"] == 6 and e["failed"] == 0
        assert e["tpot_ms"]["p50"] <= e["tpot_ms"]["p90"] <= e["tpot_ms"]["p99"]
    tests = {(t["metric"], t["test"]) for t in s["tests"]}
    assert ("tpot_ms", "kruskal-wallis") in tests and ("tpot_ms", "mann-whitney") in tests
    assert all("q" in t and "distinguishable" in t for t in s["tests"])
    rows = [json.loads(x) for x in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [r["engine"] for r in rows[:4]] == ["torch", "onnxruntime"] * 2  # rotated, same prompts per engine
    assert rows[0]["prompt_index"] == rows[1]["prompt_index"]
    assert (tmp_path / "requests.csv").read_text().startswith("index,engine,prompt_index,status")
    report = write_serving_report(tmp_path).read_text()
    assert "Kruskal-Wallis" in report and "not distinguishable" in report or "is lower" in report
    assert (tmp_path / "plots" / "serving_boxplots.png").stat().st_size > 1000


def test_load_client_refuses_anything_but_loopback(tmp_path):
    from serve.client import run_load

    with pytest.raises(ValueError, match="loopback only"):
        run_load("http://example.com:8000", None, 4, 1, 4, tmp_path)


def test_a_hugging_face_folder_is_served_by_torch(tmp_path):
    from tests.hf_models import make_hf_model

    folder = make_hf_model("llama", tmp_path / "hf")
    served = load_served(str(folder), ["torch", "onnxruntime"], "cpu", 16, tmp_path / "export")
    assert list(served.decoders) == ["torch"]
    assert "needs an export through torch.export" in served.unavailable["onnxruntime"]
    server, thread, url = _start(create_app(served))
    try:
        r = post(url, {"prompt": PROMPT, "max_tokens": 6})
        assert r.status_code == 200 and r.json()["completion"] == eager(served, PROMPT, 6)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_check_refuses_an_engine_that_decodes_differently(served):
    from runtime.decoding import TorchDecoder, check

    class Shifted(TorchDecoder):  # right prompt, wrong steps
        def next(self, token, pos):
            return super().next(token, pos).roll(1)

    ids = served.ev.tokenizer.encode(PROMPT)
    with pytest.raises(ValueError, match="torch differs from eager greedy decoding at new token 1"):
        check(Shifted(served.ev.model, served.ev.device), served.ev.model, [ids], 4)


def test_a_long_prompt_is_cut_only_when_asked(served, url):
    long = "x = 1\n" * 200
    assert post(url, {"prompt": long, "max_tokens": 8}).status_code == 413
    r = post(url, {"prompt": long, "max_tokens": 8, "truncate_prompt": True})
    assert r.status_code == 200 and r.json()["prompt_truncated"] is True
    assert r.json()["tokens_in"] == served.ev.model.params.max_seq_len - 8


def test_energy_per_request_with_a_counter(trained_checkpoint, tmp_path, monkeypatch):
    import serve.server as srv

    class Watts50:  # a counter reading 50 W at every instant
        method = "fake-50w"

        def read_j(self):
            return 50.0 * time.perf_counter()

    monkeypatch.setattr(srv, "find_counter", lambda device: (Watts50(), None))
    monkeypatch.setattr(srv, "IDLE_S", 0.2)
    served = load_served(str(trained_checkpoint), ["torch"], "cpu", 16, tmp_path)
    assert served.idle_power_w == pytest.approx(50.0, rel=1e-3)
    req = srv.CompletionRequest(prompt=PROMPT, max_tokens=8)
    short = srv.complete(served, req, time.perf_counter())["energy"]
    assert short["energy_j"] is None and "under the 1 s a reading needs" in short["reason"]
    monkeypatch.setattr(srv, "MIN_ENERGY_WINDOW_S", 0.0)
    e = srv.complete(served, req, time.perf_counter())["energy"]
    assert e["method"] == "fake-50w" and e["energy_j"] == pytest.approx(50.0 * e["window_s"], rel=1e-3)
    assert abs(e["net_energy_j"]) < 1e-3 * e["energy_j"] + 1e-6  # all of it was idle power
    assert e["j_per_token"] == pytest.approx(e["energy_j"] / e["units"])


# ---- hostile clients: every one gets a 4xx in the server's own shape, and the server goes on ----------------


def test_extreme_but_valid_sampling_settings_work(served, url):
    greedy = eager(served, PROMPT, 6)
    for body in (
        {"seed": 2**64 - 1, "temperature": 0.8},
        {"seed": -(2**63), "temperature": 0.8},
        {"top_p": 1e-300, "temperature": 1.0},  # rounds to 0 in float32: the most likely token alone is kept
    ):
        r = post(url, {"prompt": PROMPT, "max_tokens": 6, **body})
        assert r.status_code == 200, (body, r.text)
        if "top_p" in body:
            assert r.json()["completion"] == greedy


def test_malformed_bodies_get_the_servers_error_shape(url):
    bodies = [
        b'{"prompt": "\xff\xfe"}',  # invalid UTF-8
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # nesting deeper than any parser allows
        b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",  # a number longer than Python parses
    ]
    for body in bodies:
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    r = httpx.get(url + "/v1/nothing-here", trust_env=False)
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_a_request_larger_than_the_body_limit_is_refused_unread(served):
    app = create_app(served, max_body_bytes=10_000)
    server, thread, url = _start(app)
    try:
        big = {"prompt": "x" * 20_000, "max_tokens": 4}
        r = post(url, big)
        assert r.status_code == 413 and "over this server's limit of 10,000 bytes" in r.json()["error"]

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(30):
                yield b" " * 1000
            yield json.dumps({"prompt": "x", "max_tokens": 4}).encode()

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert post(url, {"prompt": PROMPT, "max_tokens": 4}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_prompt_far_beyond_the_context_is_refused_before_it_is_tokenized(served, url, monkeypatch):
    seen = []
    real = served.ev.tokenizer.encode
    monkeypatch.setattr(
        served.ev.tokenizer, "encode", lambda text, *a, **k: seen.append(len(text)) or real(text, *a, **k)
    )
    huge = "def f(x):\n    return x\n" * 20_000  # 500k characters, under the 1 MB body limit
    r = post(url, {"prompt": huge, "max_tokens": 8})
    assert r.status_code == 413 and "characters" in r.json()["error"] and seen == []
    r = post(url, {"prompt": huge, "max_tokens": 8, "truncate_prompt": True})
    assert r.status_code == 200 and r.json()["tokens_in"] == served.ev.model.params.max_seq_len - 8
    assert seen and max(seen) < 100_000  # only the end of the prompt was tokenized


def test_max_tokens_is_capped_by_the_context(trained_checkpoint, tmp_path):
    served = load_served(str(trained_checkpoint), ["torch"], "cpu", 512, tmp_path)
    context = served.ev.model.params.max_seq_len
    assert served.max_tokens_limit == context - 1
    server, thread, url = _start(create_app(served))
    try:
        r = post(url, {"prompt": "x", "max_tokens": 512})
        assert r.status_code == 400 and f"context holds {context} tokens" in r.json()["error"]
        assert "-" not in r.json()["error"].split("limit of")[1]  # never "at most -N fit"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_idle_and_slow_clients_are_disconnected(served):
    server, thread, url = _start(create_app(served), request_timeout_s=1.0)
    port = int(url.rsplit(":", 1)[1])
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        slow = socket.create_connection(("127.0.0.1", port))
        request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
        t0 = time.monotonic()
        closed_at = None
        for byte in request:  # a byte every 0.1 s: never a whole request
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic() - t0
                break
            time.sleep(0.1)
        slow.settimeout(5)
        try:
            assert slow.recv(1024) == b""
        except ConnectionResetError:
            pass
        closed_at = closed_at or time.monotonic() - t0
        assert closed_at < 4, closed_at
        for sock in idle:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed by the server, not by us
            sock.close()
        assert post(url, {"prompt": PROMPT, "max_tokens": 4}).status_code == 200  # and it still serves
    finally:
        server.should_exit = True
        thread.join(timeout=10)
