import pytest
import torch

from common.results import Spread
from eval.latency import time_decode, time_forward, time_prefill
from llama.model import Transformer
from runtime.engines import build, check


@pytest.fixture
def model(tiny_perhead_args):
    m = Transformer(tiny_perhead_args).eval()
    for layer in m.layers:
        torch.nn.init.normal_(layer.attention.head_layer.w2, std=0.1)
    return m


def test_latency_fields_and_spread(model):
    p = time_prefill(model, batch=2, prompt_len=16, warmup=1, repeats=3)
    seen = []
    d = time_decode(
        model, batch=2, context_len=16, n_tokens=4, warmup=1, repeats=2, energy=lambda run, n: seen.append(n) or {}
    )
    assert p.ms.n == 3 and 0 < p.ms.p10 <= p.ms.median <= p.ms.p90 and (p.batch, p.prompt_len) == (2, 16)
    assert d.ms_per_token.n == 2 and d.tokens_per_s == pytest.approx(2e3 / d.ms_per_token.median)
    assert seen == [8] and d.energy == {}  # the energy callback gets the decode's tokens (batch x n_tokens)
    # the JSON a result file holds is the typed row's, read back by the results' own reader
    assert (
        Spread.of(d.to_json()["ms_per_token"]) == d.ms_per_token
        and "energy" not in time_decode(model, batch=1, context_len=8, n_tokens=2, warmup=0, repeats=1).to_json()
    )
    assert model.causal_mask is None  # caches removed afterwards


def test_decode_run_decodes_n_tokens_at_the_positions_after_the_context(model, monkeypatch):
    import eval.latency as latency
    from runtime.batching import TorchSlots

    run, engine = latency.decode_run(model, batch=2, context_len=5, n_tokens=3)
    assert isinstance(engine, TorchSlots)  # the engine the server batches this model's requests in
    seen, real = [], engine.advance
    engine.advance = lambda tokens, pos: seen.append(pos.tolist()) or real(tokens, pos)
    run()
    engine.release()
    assert seen == [[[5], [5]], [[6], [6]], [[7], [7]]]  # each row at its own position, as the server's step
    assert model.causal_mask is None  # released: no cache left in the model
    # one sequence: the model's plain path (shared positions), as for the server's batch of one
    from llama.model import KVCache

    run, engine = latency.decode_run(model, batch=1, context_len=5, n_tokens=3)
    dims, update = [], KVCache.update
    monkeypatch.setattr(KVCache, "update", lambda self, pos, k, v: dims.append(pos.tolist()) or update(self, pos, k, v))
    run()
    engine.release()
    assert dims == [[p] for p in (5, 6, 7) for _ in model.layers]  # 1-D: each layer's cache on the plain path


def test_the_timed_engine_decodes_what_the_server_and_eager_generation_decode(model):
    """The device-level calls latency times (fill, advance) give the greedy tokens of eager generation, and
    of the same engine's server-level calls (open, step), for a batch of prompts."""
    from llama.generation import generate
    from runtime.batching import timed_engine
    from runtime.loop import greedy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    prompts = torch.randint(1, 97, (3, 6))
    engine = timed_engine(model, torch.device("cpu"), 3, 6 + 5)
    logits, tokens = engine.fill(prompts), []
    for i in range(5):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(nxt[:, 0].tolist())
        logits = engine.advance(nxt, engine.positions(6 + i))
    engine.release()
    timed = [list(t) for t in zip(*tokens, strict=True)]
    assert timed == generate(model, prompts.tolist(), 5)
    served = timed_engine(model, torch.device("cpu"), 3, 6 + 5)
    assert greedy(served, prompts.tolist(), [5, 5, 5]) == timed
    served.release()


def test_the_timed_engine_of_a_model_with_a_growing_cache_is_its_eager_decoder(hf_models):
    from common.cli import UserError
    from eval.model import load_for_eval
    from runtime.batching import timed_engine
    from runtime.decoding import TorchDecoder

    ev = load_for_eval(hf_models["llama"], "cpu")
    engine = timed_engine(ev.model, ev.device, 2, 12)
    assert isinstance(engine, TorchDecoder)
    p = time_prefill(ev.model, batch=2, prompt_len=8, warmup=0, repeats=2)
    d = time_decode(ev.model, batch=2, context_len=8, n_tokens=3, warmup=0, repeats=2)
    assert p.ms.n == 2 and d.ms_per_token.n == 2 and ev.model.cache is None
    with pytest.raises(UserError, match="mode compile needs a static KV cache"):
        timed_engine(ev.model, ev.device, 2, 12, mode="compile")


@pytest.mark.slow
def test_compile_mode_decodes_like_eager_on_cpu(model):
    from llama.generation import decode_one_token
    from runtime.compile import compiled

    model.setup_caches(1, 16)
    try:
        with torch.no_grad():
            model(torch.randint(0, 97, (1, 8)), torch.arange(8))
            tok, pos = torch.tensor([[3]]), torch.tensor([8])
            eager = decode_one_token(model, tok, pos)
            step = compiled(decode_one_token, "compile", torch.device("cpu"))
            out = step(model, tok, pos)
    finally:
        model.clear_caches()
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    # many models/batch sizes compile the same decode function: past dynamo's limit it must fail, not run eager
    assert torch._dynamo.config.recompile_limit >= 64 and torch._dynamo.config.fail_on_recompile_limit_hit
    d = time_decode(model, batch=1, context_len=8, n_tokens=2, mode="compile", warmup=1, repeats=2)
    assert d.mode == "compile" and d.ms_per_token.n == 2


def test_a_compiled_linear_of_a_few_rows_is_a_product_and_a_sum_and_equals_f_linear():
    """Under FewRowsLinear (what ``compiled`` wraps a CPU step in) dynamo traces a linear layer of 1 to 8 rows
    as a product and a sum, which Inductor fuses into one pass over the weight; a linear of more rows, or under
    autocast, stays F.linear. The values: F.linear's up to summation order."""
    from runtime.compile import FEW_ROWS, FewRowsLinear

    graphs = []

    def capture(gm, inputs):  # the traced graph's operations, then run it as it is
        graphs.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes})
        return gm.forward

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    xs = [torch.randn(1, 1, 64), torch.randn(2, FEW_ROWS // 2, 64), torch.randn(1, FEW_ROWS + 1, 64)]
    step = torch.compile(lambda x: lin(x) * 2, backend=capture, dynamic=False)
    with torch.no_grad(), FewRowsLinear():
        outs = [step(x) for x in xs]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step(xs[0])
    assert FEW_ROWS == 8
    for g in graphs[:2]:  # one row; FEW_ROWS rows in two sequences
        assert "linear" not in g and {"mul", "sum"} <= g, g
    assert "linear" in graphs[2] and "linear" in graphs[3]  # FEW_ROWS + 1 rows; autocast
    with torch.no_grad():
        for x, out in zip(xs[:2], outs, strict=False):
            torch.testing.assert_close(out, lin(x) * 2, atol=1e-5, rtol=1e-5)
        assert torch.equal(outs[2], lin(xs[2]) * 2)


def test_cudagraphs_mode_needs_cuda(model):
    with pytest.raises(ValueError, match="needs CUDA"):
        time_decode(model, batch=1, context_len=8, n_tokens=2, mode="compile+cudagraphs")


@pytest.mark.parametrize("name", ["torch", "torchscript", "onnxruntime", pytest.param("aoti", marks=pytest.mark.slow)])
def test_engines_match_eager_and_accept_new_shapes(model, name, tmp_path):
    # an example of batch 1, as eval.efficiency's default --batch-sizes gives: torch.export must not fix batch = 1
    engine = build(name, model, torch.randint(0, 97, (1, 16)), tmp_path)
    assert check(engine, model, shapes=((1, 5), (3, 20)), atol=1e-4) < 1e-4
    t = time_forward(engine.run, 97, batch=2, seq_len=16, device=torch.device("cpu"), warmup=1, repeats=2)
    assert t.ms.n == 2 and t.tokens_per_s > 0


def test_engine_check_catches_a_wrong_engine(model):
    from runtime.engines import ForwardEngine

    wrong = ForwardEngine("wrong", lambda tokens: model(tokens) + 1e-2)
    with pytest.raises(AssertionError, match="differs from eager"):
        check(wrong, model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cudagraph_decode_matches_eager_on_gpu(model):
    # The mode behind the GPU decode table computes what eager decoding computes, at every position: the
    # replayed graph reads each step's new position and writes the cache where eager decoding would.
    from llama.generation import decode_one_token
    from runtime.compile import compiled

    m = model.cuda()  # the fixture's per-head model, its per-head layers switched on
    m.setup_caches(2, 16)
    step = compiled(decode_one_token, "compile+cudagraphs", torch.device("cuda"))
    try:
        with torch.no_grad():
            m(torch.randint(0, 97, (2, 8), device="cuda"), torch.arange(8, device="cuda"))
            tok = torch.randint(0, 97, (2, 1), device="cuda")
            for i in range(4):  # warm-up, recording, then replays
                pos = torch.tensor([8 + i], device="cuda")
                eager = decode_one_token(m, tok, pos).clone()
                torch.testing.assert_close(step(m, tok, pos), eager, atol=1e-4, rtol=1e-4)
    finally:
        m.clear_caches()


def test_tests_not_marked_cuda_see_a_cpu_machine():
    # conftest's cpu_unless_marked_cuda: on a GPU machine too, "auto" means the CPU here and in child processes
    import os

    from common.device import pick_device

    assert pick_device("auto") == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_efficiency_leaves_no_exports_behind(model, tmp_path, monkeypatch):
    import tempfile

    from eval.efficiency import Timings, evaluate_efficiency

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t = Timings([1], 8, 8, 2, ["eager"], ["onnxruntime"], energy=False, repeats=1, progress=False)
    r = evaluate_efficiency(model, torch.device("cpu"), t)
    assert [f.engine for f in r.forward] == ["onnxruntime"] and r.forward[0].error is None
    assert r.to_json()["forward"][0]["engine"] == "onnxruntime" and "ms" in r.to_json()["forward"][0]
    assert list(tmp_path.iterdir()) == []


def test_an_efficiency_result_records_its_threads_and_the_machines_load(trained_checkpoint, tmp_path):
    import json

    from eval.efficiency import main

    out = tmp_path / "eff.json"
    argv = [str(trained_checkpoint), "--batch-sizes", "1", "--context", "8", "--prompt-len", "8", "--n-tokens", "2"]
    main([*argv, "--engines", "torch", "--repeats", "1", "--no-energy", "--threads", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["threads"] == 1 and torch.get_num_threads() == 1
    load = r["load"]
    assert load["cores"] >= 1 and load["seconds"] > 0 and load["busy"] in (True, False)
    assert load["other_processes_cores"] >= 0.0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_timed_engine_under_cuda_graphs_decodes_as_eager_on_gpu(model):
    # what the GPU latency rows time: the server's engine, rows at their own positions, replayed as a CUDA graph
    from runtime.batching import timed_engine

    m = model.cuda()  # the fixture's per-head model, its per-head layers switched on
    cuda = torch.device("cuda")
    prompts = torch.randint(0, 97, (2, 8), device=cuda)
    graphs, eager = timed_engine(m, cuda, 2, 16, "compile+cudagraphs"), timed_engine(m, cuda, 2, 16)
    a, b = graphs.fill(prompts), eager.fill(prompts)
    for i in range(4):  # warm-up, recording, then replays
        tok = b.argmax(-1, keepdim=True)
        a = graphs.advance(tok, graphs.positions(8 + i)).clone()
        b = eager.advance(tok, eager.positions(8 + i))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    graphs.release()
    eager.release()


def test_the_timings_settings_are_one_checked_object():
    from common.cli import UserError
    from eval.efficiency import Args, Timings

    t = Timings([1, 8], 16, 16, 4, ["eager"], ["torch"])
    assert t.batch_sizes == (1, 8) and t.repeats == 5 and hash(t)
    for bad, flag in (
        ({"repeats": 0}, "--repeats"),
        ({"prompt_len": 0}, "--prompt-len"),
        ({"batch_sizes": [0]}, "--batch-sizes"),
    ):
        with pytest.raises(UserError, match=f"{flag} must be at least 1"):
            Timings(
                **(
                    {
                        "batch_sizes": [1],
                        "context": 8,
                        "prompt_len": 8,
                        "n_tokens": 2,
                        "modes": ["eager"],
                        "engines": [],
                    }
                    | bad
                )
            )
    a = Args(checkpoint="x", batch_sizes=[2], n_tokens=3, repeats=2, energy=False)
    assert a.timings(32, ["eager"], ["torch"]) == Timings([2], 32, 32, 3, ["eager"], ["torch"], False, repeats=2)
