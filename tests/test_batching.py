"""Continuous batching: sequences joining and leaving a running batch decode as each would alone (runtime),
the scheduler keeps streams, stops, seeds and departures apart (serve/scheduler.py), and a server under eight
concurrent streams answers each as greedy decoding alone, its figures defined as vLLM's and guidellm's."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch

from llama.generation import generate
from llama.model import ModelArgs, Transformer
from runtime.batching import TorchSlots
from runtime.decoding import TorchDecoder
from runtime.engines import Engine, check
from runtime.loop import ClientGone, Sequence, greedy
from runtime.sampling import SamplingParams
from serve.scheduler import Scheduler

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=96)).eval()
    for p in m.parameters():  # peaked logits: greedy choices far from ties
        p.data.normal_(0, 0.3)
    return m


PROMPTS = [[1, 5, 7, 9], [1, 100], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 250, 33], [7]]


def test_rows_at_their_own_positions_equal_each_sequence_alone(model):
    """One forward step of three sequences at three different positions gives each row the logits that
    sequence gets alone (to float rounding), and positions per row equal shared ones when they agree."""
    torch.set_num_threads(1)
    model.clear_caches()
    with torch.no_grad():  # no cache at all: the full causal forward of each sequence alone
        alone = [model(torch.tensor([p + [11 + s]]))[0, -1] for s, p in enumerate(PROMPTS[:3])]
    slots = TorchSlots(model, CPU, max_batch=4)
    for s, p in enumerate(PROMPTS[:3]):
        slots.open(s, p)
    rows = slots.step([0, 1, 2], [11, 12, 13], [len(p) for p in PROMPTS[:3]])
    for s in range(3):
        assert torch.allclose(rows[s], alone[s], atol=1e-4), s
    x = torch.randint(0, 300, (2, 5))
    model.setup_caches(2, 96)
    shared = model(x, torch.arange(5))
    model.setup_caches(2, 96)
    per_row = model(x, torch.arange(5).expand(2, 5))
    assert torch.equal(shared, per_row)
    model.clear_caches()


@pytest.mark.parametrize("max_batch", [2, 4])
def test_sequences_that_join_and_leave_a_batch_decode_as_greedy_alone(model, max_batch):
    torch.set_num_threads(1)
    slots = TorchSlots(model, CPU, max_batch)
    assert isinstance(slots, Engine)  # one hierarchy: checked as every engine is
    check(slots, model, PROMPTS, 10)  # raises on any difference
    lengths = [10, 3, 7, 1, 10]
    got = greedy(slots, PROMPTS, lengths, join_every=2)
    for p, n, tokens in zip(PROMPTS, lengths, got, strict=True):
        assert tokens == generate(model, [p], n)[0]


def test_two_engines_of_one_model_keep_their_sequences_apart(model):
    """torch and compile engines share the model: steps taken in turn never mix their caches."""
    torch.set_num_threads(1)
    a, b = TorchSlots(model, CPU, 2), TorchSlots(model, CPU, 2)
    la, lb = a.open(0, PROMPTS[0]), b.open(0, PROMPTS[2])
    out_a, out_b = [int(la.argmax())], [int(lb.argmax())]
    for _ in range(6):
        la = a.step([0], [out_a[-1]], [len(PROMPTS[0]) + len(out_a) - 1])[0]
        lb = b.step([0], [out_b[-1]], [len(PROMPTS[2]) + len(out_b) - 1])[0]
        out_a.append(int(la.argmax()))
        out_b.append(int(lb.argmax()))
    assert out_a == generate(model, [PROMPTS[0]], 7)[0] and out_b == generate(model, [PROMPTS[2]], 7)[0]


def test_each_engine_keeps_its_cache_in_its_own_view_of_the_same_weights(model):
    """No cache swapping: a batching engine and a decoder of one model decode in views that share the model's
    weights (no copy), each holding its own cache; the model itself never holds one."""
    slots, decoder = TorchSlots(model, CPU, 2), TorchDecoder(model, CPU)
    slots.open(0, PROMPTS[0])
    decoder.start(PROMPTS[1])
    own = [e.view.layers[0].attention.kv_cache for e in (slots, decoder)]
    assert model.layers[0].attention.kv_cache is None and own[0] is not None and own[1] is not None
    assert own[0] is not own[1] and own[0].k_cache.shape[0] == 2 and own[1].k_cache.shape[0] == 1
    for view in (slots.view, decoder.view):
        assert [p.data_ptr() for p in view.parameters()] == [p.data_ptr() for p in model.parameters()]
    slots.release()
    assert slots.view.layers[0].attention.kv_cache is None and decoder.view.layers[0].attention.kv_cache is own[1]
    assert int(slots.open(1, PROMPTS[2]).argmax()) == generate(model, [PROMPTS[2]], 1)[0][0]  # set up again


def test_a_batch_that_cannot_fit_in_memory_is_refused_in_one_line(model):
    with pytest.raises(Exception, match="--max-batch 100000000 needs .* GiB of KV cache"):
        TorchSlots(model, CPU, 100_000_000)


def test_check_slots_refuses_an_engine_that_mixes_rows(model):
    class Swapped(TorchSlots):  # answers each row with its neighbour's logits
        def step(self, slots, tokens, positions):
            return super().step(slots, tokens, positions).roll(1, 0)

    with pytest.raises(ValueError, match="differs from greedy decoding alone"):
        check(Swapped(model, CPU, 4), model, PROMPTS, 6)


def test_the_engines_check_and_the_server_decode_through_one_loop(model, monkeypatch):
    """Slots.check and the server's scheduler both run runtime.loop.Batch: what the check passes is the loop that
    serves."""
    import runtime.loop as loop

    calls, real = [], loop.Batch.step
    monkeypatch.setattr(loop.Batch, "step", lambda self, admit: calls.append(len(admit)) or real(self, admit))
    slots = TorchSlots(model, CPU, 3)
    check(slots, model, PROMPTS, 4)
    assert sum(calls) == max(len(PROMPTS), 3 + 1) and len(calls) > sum(calls)  # each prompt joined through it
    calls.clear()
    [seq] = _run(Scheduler(slots, threading.Lock()), [Sequence(PROMPTS[0], SamplingParams(3))])
    assert seq.tokens == generate(model, [PROMPTS[0]], 3)[0] and sum(calls) == 1


def _run(scheduler, seqs, timeout=60):
    scheduler.submit(seqs)
    for s in seqs:
        assert s.done.wait(timeout)
    return seqs


def test_the_scheduler_keeps_seeds_stops_and_departures_per_sequence(model):
    """Sampled sequences in a batch draw exactly what they draw alone (same seed), a stop or a departed client
    ends one sequence and not its neighbours, and a sequence queued past the batch's size waits its turn."""
    torch.set_num_threads(1)
    lock = threading.Lock()
    batched = Scheduler(TorchSlots(model, CPU, 3), lock)
    alone = Scheduler(TorchDecoder(model, CPU), lock)  # a decoder is an engine of one slot

    def seqs():
        return [Sequence(p, SamplingParams(12, 1.0, 0.9, seed=40 + i)) for i, p in enumerate(PROMPTS)]

    a, b = _run(batched, seqs()), _run(alone, seqs())
    assert batched.largest_batch == 3 and alone.largest_batch == 1
    assert [s.tokens for s in a] == [s.tokens for s in b] and all(len(s.tokens) == 12 for s in a)
    assert len({tuple(s.tokens) for s in a}) == len(PROMPTS)  # different seeds, different draws

    def leave_at_3(token, logits, seen=[]):  # noqa: B006 - the list counts this sequence's tokens
        seen.append(token)
        if len(seen) == 3:
            raise ClientGone

    greedy_alone = [generate(model, [p], 12)[0] for p in PROMPTS[:3]]
    stop_at = greedy_alone[1][4]
    left = Sequence(PROMPTS[0], SamplingParams(12), on_token=leave_at_3)
    stopped = Sequence(PROMPTS[1], SamplingParams(12), stop=lambda toks: toks[-1] == stop_at)
    full = Sequence(PROMPTS[2], SamplingParams(12))
    _run(batched, [left, stopped, full])
    assert isinstance(left.error, ClientGone) and left.tokens == greedy_alone[0][:3]
    assert stopped.error is None and stopped.tokens == greedy_alone[1][: greedy_alone[1].index(stop_at) + 1]
    assert full.error is None and full.tokens == greedy_alone[2]
    gone = threading.Event()
    gone.set()
    # its client left before it was admitted: nothing decoded
    queued = Sequence(PROMPTS[0], SamplingParams(12), gone=gone)
    _run(batched, [queued])
    assert isinstance(queued.error, ClientGone) and queued.tokens == [] and queued.admitted is None


def test_an_engine_failure_ends_the_batch_with_the_error_and_the_scheduler_goes_on(model):
    class Fails(TorchSlots):
        fail = True

        def step(self, slots, tokens, positions):
            if self.fail:
                raise RuntimeError("the device fell over")
            return super().step(slots, tokens, positions)

    slots = Fails(model, CPU, 2)
    scheduler = Scheduler(slots, threading.Lock())
    seqs = _run(scheduler, [Sequence(p, SamplingParams(5)) for p in PROMPTS[:2]])
    assert all("fell over" in str(s.error) for s in seqs)
    slots.fail = False
    [ok] = _run(scheduler, [Sequence(PROMPTS[0], SamplingParams(5))])
    assert ok.error is None and ok.tokens == generate(model, [PROMPTS[0]], 5)[0]


# ---- the server --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batched_server(trained_checkpoint, tmp_path_factory):
    from serve.server import create_app, load_served
    from tests.test_serve import serving

    served = load_served(str(trained_checkpoint), ["torch"], "cpu", 48, tmp_path_factory.mktemp("x"), max_batch=8)
    with serving(create_app(served)) as url:
        yield served, url


def test_eight_concurrent_streams_are_decoded_together_each_as_greedy_alone(batched_server):
    served, url = batched_server
    tok = served.ev.tokenizer
    prompts = ["def add(a, b):\n", "import os\n", "class Stack:\n", "x = [", "for i in range(", "# a", "if x", "y"]
    lengths = [14, 9, 12, 16, 5, 12, 10, 8]  # the test model's context is 32 tokens

    async def one(client, prompt, n):
        body = {"model": "t", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
        body["stream_options"] = {"include_usage": True}
        text, last = "", None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    import json

                    last = json.loads(line[6:])
                    text += "".join(c["text"] for c in last["choices"])
        return text, last

    async def all_of_them():
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths, strict=True)))

    answers = asyncio.run(all_of_them())
    for prompt, n, (text, last) in zip(prompts, lengths, answers, strict=True):
        expected = tok.decode(generate(served.ev.model, [tok.encode(prompt)], n, eos_id=tok.eos_id)[0])
        assert text == expected and len(expected) > 0, prompt
        assert last["choices"] == [] and last["usage"]["completion_tokens"] <= n
    assert served.schedulers["torch"].largest_batch >= 4  # they did share steps
    assert any(last["batched"] for _, last in answers)
    assert all(last["energy"]["method"] == "unavailable" or last["energy"]["energy_j"] is None for _, last in answers)


def test_as_many_streams_as_slots_share_one_step(batched_server):
    """8 streams at once with --max-batch 8 decode in one batch of 8: every request in flight reaches the
    scheduler (none waits for a thread of asyncio's default pool, cores + 4 threads: 6 on 2 cores). The compute
    lock is held until all 8 have been submitted, so no request can end before the others join."""
    served, url = batched_server
    scheduler = served.schedulers["torch"]
    submitted, real_submit = [], scheduler.submit

    def counting(seqs):
        submitted.extend(seqs)
        real_submit(seqs)

    async def eight():
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            body = {"model": "t", "prompt": "x = ", "max_tokens": 6, "ignore_eos": True, "stream": True}
            return await asyncio.gather(*(client.post(url + "/v1/completions", json=body) for _ in range(8)))

    scheduler.submit, scheduler.batch.largest_batch, answers = counting, 0, []
    try:
        with served.lock:  # no step runs until every request is in the scheduler's hands
            client = threading.Thread(target=lambda: answers.extend(asyncio.run(eight())))
            client.start()
            deadline = time.monotonic() + 30
            while len(submitted) < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(submitted) == 8, f"only {len(submitted)} of 8 requests reached the scheduler"
        client.join(120)
    finally:
        scheduler.submit = real_submit
    assert [r.status_code for r in answers] == [200] * 8
    assert scheduler.largest_batch == 8


def test_n_choices_decode_together_and_each_equals_its_seed_alone(batched_server):
    """n=4 sampled choices of one request run in one batch; choice j equals the same request's seed + j
    decoded alone (runtime/decoding.py's loop, one sequence)."""
    served, url = batched_server
    tok = served.ev.tokenizer
    body = {"model": "t", "prompt": "def f(x):\n", "max_tokens": 10, "temperature": 0.9, "n": 4, "seed": 7}
    r = httpx.post(url + "/v1/completions", json=body | {"ignore_eos": True}, timeout=120, trust_env=False)
    assert r.status_code == 200, r.text
    d = r.json()
    decoder = TorchDecoder(served.ev.model, served.ev.device)
    ids = tok.encode("def f(x):\n")
    for j, choice in enumerate(sorted(d["choices"], key=lambda c: c["index"])):
        out = decoder.generate(ids, SamplingParams(10, 0.9, seed=7 + j)).tokens
        assert choice["text"] == tok.decode(out)
    assert d["batched"] is True and len({c["text"] for c in d["choices"]}) > 1


def test_a_batched_servers_energy_is_taken_over_the_whole_run(trained_checkpoint, tmp_path, monkeypatch):
    """With a counter, J/token of a run is the counter's two readings over the run's tokens (GET /energy),
    never the sum of overlapping per-request windows."""
    import serve.engine as srv
    from serve.client import Load, run_load
    from serve.server import create_app, load_served
    from tests.test_serve import serving

    class Watts50:
        method = "fake-50w"

        def read_j(self):
            return 50.0 * time.perf_counter()

    monkeypatch.setattr(srv, "find_counter", lambda device: (Watts50(), None))
    monkeypatch.setattr(srv, "IDLE_S", 0.1)
    served = load_served(str(trained_checkpoint), ["torch"], "cpu", 16, tmp_path / "x", max_batch=4)
    with serving(create_app(served)) as url:
        t0 = time.perf_counter()
        s = run_load(url, Load(8, 4, 6, ["t"]), tmp_path / "load", ["def f(x):\n", "import os\n"], progress=False)
        wall = time.perf_counter() - t0
    e = s["energy"]
    tokens = s["targets"]["t"]["tokens_out"]
    assert e["method"] == "fake-50w" and 0 < e["window_s"] <= wall
    assert e["energy_j"] == pytest.approx(50.0 * e["window_s"], rel=1e-2)
    assert e["j_per_token"] == pytest.approx(e["energy_j"] / tokens)


def test_the_clients_guidellm_figures_are_guidellms_formulas_on_a_recorded_stream():
    """The stream of the vLLM test (a first chunk with empty text, two text chunks, the usage chunk, [DONE] at
    100.060): guidellm 0.8 starts its first token at the first chunk WITH text; its TPOT is the time from the
    request's start to the last token over all output tokens (``request_stats.py``: (last_token - request_start)
    / output_tokens), TTFT included."""
    from serve.client import guidellm_metrics, stream_metrics

    t0 = 100.0
    text_times = [100.030, 100.045]  # the chunks whose text is not empty
    g = guidellm_metrics(t0, text_times, 100.060, tokens_out=3)
    # guidellm, by hand: ttft = 30 ms; tpot = (45 - 0) / 3 = 15 ms; itl = (45 - 30) / (3 - 1) = 7.5 ms; latency 60
    assert g["guidellm_ttft_ms"] == pytest.approx(30.0) and g["guidellm_tpot_ms"] == pytest.approx(15.0)
    assert g["guidellm_itl_ms"] == pytest.approx(7.5) and g["guidellm_latency_ms"] == pytest.approx(60.0)
    v = stream_metrics(t0, [(100.010, True), (100.030, True), (100.045, True), (100.050, False)], 3)
    assert v["ttft_ms"] == pytest.approx(10.0) and v["tpot_ms"] == pytest.approx(17.5)  # vLLM's, beside
    assert guidellm_metrics(t0, [], 100.1, 0)["guidellm_ttft_ms"] is None


def test_absurd_batch_settings_and_a_resume_with_other_settings_are_one_line(tmp_path, batched_server):
    import json

    from bench.batched_serving import main as bench_main
    from common.cli import ConfigError, UserError, parse_args
    from serve.server import Args

    for bad in ("0", "-3"):
        with pytest.raises(ConfigError, match="--max-batch must be positive"):
            parse_args(Args(), ["ckpt", "--max-batch", bad])
    work = tmp_path / "work"
    work.mkdir()
    (work / "settings.json").write_text(json.dumps({"checkpoint": "x", "max_tokens": 7}))
    with pytest.raises(UserError, match="holds runs made with other settings"):
        bench_main(["ckpt", "--work", str(work), "--out", str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()
    _, url = batched_server  # a server without an energy counter says so, and the client takes no figure
    e = httpx.get(url + "/energy", trust_env=False).json()
    assert e["method"] == "unavailable" and e["energy_j"] is None and e["reason"]


def test_engines_use_the_thread_count_the_server_sets(model, tmp_path, monkeypatch):
    """The server leaves one core to its event loop and text streams (--threads, default every core but one),
    and every engine's runtime follows the process's one setting, as each runtime reports it."""
    from common.cli import ConfigError, parse_args
    from runtime.decoding import build_decoder
    from serve import server

    monkeypatch.setattr(server, "cores", lambda: 4)
    assert server.engine_threads(None) == 3 and server.engine_threads(2) == 2
    monkeypatch.setattr(server, "cores", lambda: 1)
    assert server.engine_threads(None) == 1
    with pytest.raises(ConfigError, match="--threads must be positive"):
        parse_args(server.Args(), ["ckpt", "--threads", "0"])
    before = torch.get_num_threads()
    try:
        for want in (1, 2):
            torch.set_num_threads(want)
            for engine in ("onnxruntime", "openvino"):
                decoder = build_decoder(engine, model, torch.device("cpu"), tmp_path / engine)
                assert decoder.threads == want, (engine, decoder.threads)
    finally:
        torch.set_num_threads(before)


def test_the_request_threads_are_as_many_as_the_connections_the_server_accepts():
    """--max-connections sizes the threads that wait for requests' sequences: that many run at once, no more."""
    from types import SimpleNamespace

    from serve.served import Served

    served = Served(SimpleNamespace(name="m"), {}, {}, 4, max_connections=3)
    running, most, gate = [0], [0], threading.Event()
    guard = threading.Lock()

    def wait():
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        gate.wait(10)
        with guard:
            running[0] -= 1

    futures = [served.requests.submit(wait) for _ in range(5)]
    deadline = time.monotonic() + 10
    while most[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a fourth thread, were there one, would have started by now
    assert most[0] == 3
    gate.set()
    for f in futures:
        f.result(10)
    served.requests.shutdown()


def test_batched_logprobs_agree_with_alone_to_the_stated_tolerance(batched_server):
    """Eight requests with logprobs at once (decoded in one batch) and each alone: the same tokens, and
    log-probabilities within 1e-5 (docs/serving.md: a batched row sums in another order)."""
    served, url = batched_server
    prompts = ["def add(a, b):\n", "import os\n", "class Stack:\n", "x = [", "for i in range(", "# a", "if x", "y"]
    body = {"model": "t", "max_tokens": 8, "temperature": 0, "logprobs": 2}

    async def all_of_them():
        async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
            posts = [client.post(url + "/v1/completions", json=body | {"prompt": p}) for p in prompts]
            return [r.json() for r in await asyncio.gather(*posts)]

    together = asyncio.run(all_of_them())
    for prompt, batched in zip(prompts, together, strict=True):
        alone = httpx.post(url + "/v1/completions", json=body | {"prompt": prompt}, timeout=120).json()
        a, b = alone["choices"][0]["logprobs"], batched["choices"][0]["logprobs"]
        assert b["tokens"] == a["tokens"] and b["text_offset"] == a["text_offset"]
        assert b["token_logprobs"] == pytest.approx(a["token_logprobs"], abs=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logprobs_are_placed_by_the_settled_text_and_never_run_past_it(kind, hf_models):
    """Random token sequences of a byte-level tokenizer (characters split over several tokens, whose pieces read
    as U+FFFD alone): without a stop, every token's logprob comes out, each at the offset where its text begins;
    with a stop string cut into the text, no released token's text reaches past the text sent."""
    import random

    from models.hf_tokenizer import HFTokenizer
    from serve.detokenize import LogprobsHeld, TextStream

    tok = HFTokenizer(hf_models[kind])
    rng = random.Random(1)
    for trial in range(120):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        whole = tok.decode(ids)
        stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
        stops = [stop] if trial % 2 and len(whole) > 6 and "\ufffd" not in stop else []
        s, held, got = TextStream(tok.decode, stops), LogprobsHeld(), []
        for t in ids:
            held.add({"token": "?"})
            s.push(t)
            held.settle(s.settled)
            got += held.release(len(s.sent))
            if s.hit:
                break
        s.finish()
        held.settle(s.settled)
        got += held.release(len(s.sent))
        offsets = [e["offset"] for e in got]
        assert offsets == sorted(offsets) and all(0 <= o <= len(s.sent) for o in offsets)
        if not stops or not s.hit:
            assert len(got) == len(s.ids), (kind, ids)  # none lost
        else:
            assert len(got) <= len(s.ids) and held.chars >= len(s.sent)
            assert all(e["offset"] < len(s.sent) or len(s.sent) == 0 for e in got)


# ---- Hugging Face folders ------------------------------------------------------------------------------------


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (int(k),), generator=g).tolist() for k in torch.randint(2, 40, (n,), generator=g)]


@pytest.mark.parametrize(
    "arch, attention",
    [("llama", "sdpa"), ("gpt_neox", "sdpa"), ("gpt2", "sdpa"), ("starcoder2", "sdpa"), ("llama", "eager")],
)
def test_a_hugging_face_batch_decodes_each_sequence_as_transformers_generate(arch, attention, hf_models):
    """Twelve prompts of 2 to 40 tokens joining eight slots two steps apart and leaving at different steps: every
    continuation equals transformers' own greedy ``generate`` of that prompt alone, token for token (each step's
    4D mask prepared here, boolean for SDPA and additive for eager attention)."""
    from runtime.batching import HFSlots, build_slots
    from runtime.loading import load_model

    ev = load_model(str(hf_models[arch]), "cpu", "float32")
    ev.model.hf.set_attn_implementation(attention)
    slots = build_slots(TorchDecoder(ev.model, ev.device), ev.model, ev.device, 8)
    assert isinstance(slots, HFSlots) and slots.max_batch == 8 and "continuous batching" in slots.note
    prompts = _prompts(12)
    lengths = [20 - (i % 5) for i in range(len(prompts))]
    got = greedy(slots, prompts, lengths, join_every=2)
    hf = ev.model.hf
    for p, n, tokens in zip(prompts, lengths, got, strict=True):
        ids = torch.tensor([p])
        expected = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == expected[0, len(p) :].tolist(), (arch, p)
    assert slots.rows == [] and slots.cache is None  # every row left; nothing held


def test_a_hugging_face_batch_cuts_the_columns_no_row_uses_and_refuses_a_step_of_other_slots(hf_models):
    from runtime.batching import HFSlots
    from runtime.loading import load_model

    ev = load_model(str(hf_models["llama"]), "cpu", "float32")
    slots = HFSlots(ev.model, ev.device, 4)
    long, short = list(range(1, 31)), [5, 6, 7]
    slots.open(0, long)
    slots.open(2, short)
    assert slots.valid.shape == (2, 30) and slots.valid[1].sum() == 3  # the short row padded on the left
    slots.step([0, 2], [1, 2], [30, 3])
    assert slots.cache.layers[0].keys.shape[2] == 31
    slots.close(0)  # the long row leaves: only the short one's 4 columns are kept
    assert slots.rows == [2] and slots.valid.shape == (1, 4) and slots.cache.layers[0].keys.shape[:3] == (1, 2, 4)
    with pytest.raises(ValueError, match="the open ones are"):
        slots.step([1], [3], [4])
    with pytest.raises(ValueError, match="is taken"):
        slots.open(2, short)
    # the row left alone goes on as the same prompt decoded alone would
    alone = generate(ev.model, [short + [2]], 3)[0]
    out = [int(slots.step([2], [2], [4])[0].argmax())]
    for k in range(2):
        out.append(int(slots.step([2], [out[-1]], [5 + k])[0].argmax()))
    assert out == alone


def test_a_sliding_window_cache_is_served_one_sequence_at_a_time_and_says_why(tmp_path):
    from runtime.batching import build_slots
    from runtime.loading import load_model
    from tests import hf_models as H

    folder = H.make_hf_model("starcoder2", tmp_path / "sw")
    import json

    cfg = json.loads((folder / "config.json").read_text()) | {"sliding_window": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    ev = load_model(str(folder), "cpu", "float32")
    decoder = TorchDecoder(ev.model, ev.device)
    slots = build_slots(decoder, ev.model, ev.device, 8)
    assert slots is decoder and slots.max_batch == 1  # the decoder itself, an engine of one slot
    assert "does not batch here" in slots.note and "Sliding" in slots.note
    assert build_slots(decoder, ev.model, ev.device, 8).note.count("one sequence at a time") == 1


def test_eight_concurrent_requests_to_a_hugging_face_folder_decode_together_as_generate(hf_models, tmp_path):
    """The server batches a Hugging Face folder: 8 concurrent greedy completions share steps, /health says so,
    and each answer's tokens are transformers' greedy ``generate`` of its prompt."""
    import json

    from serve.server import create_app, load_served
    from tests.test_serve import completions_at_once, serving

    served = load_served(str(hf_models["llama"]), ["torch"], "cpu", 24, tmp_path, max_batch=8)
    tok, hf = served.ev.tokenizer, served.ev.model.hf
    prompts = ["def add(a, b):\n", "import os\n", "class Stack:\n", "x = [", "for i in", "# a", "if x", "y = {"]
    with serving(create_app(served)) as url:
        health = httpx.get(url + "/health", trust_env=False).json()
        assert "continuous batching of up to 8" in json.dumps(health)
        body = {"model": "llama", "max_tokens": 12, "temperature": 0, "logprobs": 1}
        answers = completions_at_once(url, [body | {"prompt": p} for p in prompts])
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tok.encode(prompt)
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_id)
        new = out[0, len(ids) :].tolist()
        new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
        assert answer["choices"][0]["text"] == tok.decode(new), prompt
    assert served.schedulers["torch"].largest_batch >= 4


def test_the_engines_alone_bench_times_hugging_face_folders_on_the_servers_batching_engine(hf_models, monkeypatch):
    """bench.batched_serving's in-process rows use the engine the server would (HFSlots for an HF folder) and skip
    the compile engine the server has none of for it; every batch size gets one figure per round."""
    import runtime.batching as batching
    from bench.batched_serving import Args, engine_rows

    built = []
    real = batching.build_slots
    monkeypatch.setattr(batching, "build_slots", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    a = Args(checkpoint=str(hf_models["llama"]), engines=["torch", "compile"], rounds=2, max_tokens=8)
    rows = engine_rows(a, threads=1, sizes=(1, 2), steps=3)
    assert [type(s).__name__ for s in built] == ["HFSlots"]
    assert [(r["engine"], r["batch"], r["rounds"]) for r in rows] == [("torch", 1, 2), ("torch", 2, 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows) and rows[0]["vs_batch_1_median"] == 1.0


def test_a_hugging_face_decoder_keeps_its_cache_in_its_own_view_too(hf_models):
    from runtime.loading import load_model

    ev = load_model(str(hf_models["llama"]), "cpu", "float32")
    a, b = TorchDecoder(ev.model, ev.device), TorchDecoder(ev.model, ev.device)
    a.start([1, 5, 9])
    b.start([1, 7])
    assert ev.model.cache is None and a.view.cache is not None and a.view.cache is not b.view.cache
    assert [p.data_ptr() for p in a.view.parameters()] == [p.data_ptr() for p in ev.model.parameters()]
    assert a.generate([1, 5, 9], SamplingParams(6)).tokens == generate(ev.model, [[1, 5, 9]], 6)[0]
