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
