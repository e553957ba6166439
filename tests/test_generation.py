import pytest
import torch

from llama.generation import generate, logits_to_probs, sample
from llama.model import Transformer


def test_greedy_generate_equals_argmax_loop(tiny_args):
    model = Transformer(tiny_args).eval()
    prompt = [5, 9, 13, 2, 7]
    out = generate(model, [prompt], max_new_tokens=10)[0]
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == seq[0, 5:].tolist()
    assert model.causal_mask is None  # the cache is removed afterwards


def test_batched_generation_equals_one_by_one(tiny_perhead_args):
    model = Transformer(tiny_perhead_args).eval()
    for layer in model.layers:
        torch.nn.init.normal_(layer.attention.head_layer.w2, std=0.1)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23]]
    batched = generate(model, prompts, max_new_tokens=9)
    single = [generate(model, [p], max_new_tokens=9)[0] for p in prompts]
    assert batched == single


def test_eos_and_stop_end_sequences(tiny_args):
    model = Transformer(tiny_args).eval()
    free = generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    cut = generate(model, [[1, 2, 3]], max_new_tokens=8, eos_id=free[2])[0]
    assert cut == free[: free.index(free[2])]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=8, stop=lambda ids: len(ids) == 4)[0]
    assert stopped == free[:4]


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = logits_to_probs(logits, temperature=1.0, top_k=2)
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = logits_to_probs(logits, temperature=1.0, top_p=0.7)  # 0.5 < 0.7, so 0.3 joins; 0.8 >= 0.7 stops
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample(logits, temperature=0.0).item() == 0


def test_prefill_projects_only_the_last_position_and_equals_the_full_forward(tiny_args):
    from llama.generation import prefill
    from llama.model import Transformer

    model = Transformer(tiny_args).eval()
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(x)[:, -1]
        seen = []
        hook = model.output.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
        model.setup_caches(2, 16)
        last = prefill(model, x, torch.arange(12))
        hook.remove()
    assert seen == [(2, 1, 64)]  # the vocabulary projection ran on one position per row, not twelve
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)


def test_sampling_follows_the_probabilities_by_a_chi_square_test():
    from scipy import stats

    # 20,000 draws from a known 5-way distribution (after temperature 1): the counts fit it (p > 1e-4 holds in
    # all but one draw in ten thousand of a correct sampler), and a sampler that ignored p would fail at once
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    logits = probs.log().expand(20_000, -1).contiguous()
    gen = torch.Generator().manual_seed(0)
    draws = sample(logits, temperature=1.0, generator=gen)
    counts = torch.bincount(draws, minlength=5).double()
    assert stats.chisquare(counts.numpy(), (probs.double() * 20_000).numpy()).pvalue > 1e-4
    again = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # a seed gives the same tokens
    top1 = sample(logits, temperature=1.0, top_k=1, generator=gen)
    assert (top1 == 0).all()


def test_sampling_settings_are_one_checked_hashable_value():
    """SamplingParams: the settings every decoder, the scheduler and the evaluators take; an absurd value is one
    line naming each field; equal settings are equal keys (the lm-eval adapter batches by them)."""
    from runtime.sampling import SamplingParams

    a = SamplingParams(8, 0.7, 0.9, stop=["\n\n"])
    assert a == SamplingParams(8, 0.7, 0.9, stop=("\n\n",))
    assert len({a, SamplingParams(8, 0.7, 0.9, stop=["\n\n"])}) == 1
    assert a != SamplingParams(8, 0.7, 0.9)
    for bad, field in (
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"logprobs": -2}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


def test_a_decoder_returns_a_typed_completion_with_its_finish_reason(tiny_args):
    from runtime.decoding import TorchDecoder
    from runtime.sampling import Completion, SamplingParams

    torch.manual_seed(0)
    model = Transformer(tiny_args).eval()
    decoder = TorchDecoder(model, torch.device("cpu"))
    full = decoder.generate([1, 2, 3], SamplingParams(5))
    assert isinstance(full, Completion) and full.finish == "length"
    assert full.tokens == generate(model, [[1, 2, 3]], 5)[0] and len(full.times) == 5
    assert full.times == sorted(full.times) and full.times[0] > 0
    two = decoder.generate([1, 2, 3], SamplingParams(5), stop=lambda t: len(t) >= 2)
    assert (two.tokens, two.finish) == (full.tokens[:2], "stop")
    at_eos = decoder.generate([1, 2, 3], SamplingParams(5), eos_id=full.tokens[0])
    assert (at_eos.tokens, at_eos.finish) == ([], "stop")
