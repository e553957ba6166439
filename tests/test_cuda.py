"""GPU paths. CI has no GPU: every test here skips cleanly without CUDA (CPU tests cover the same logic)."""

import pytest
import torch

from llama.model import Transformer

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_nvml_energy_counter_measures_gpu_work():
    from common.energy import measure_energy

    x = torch.randn(4096, 4096, device="cuda")
    r = measure_energy(lambda: x @ x, 1, "cuda", min_window_s=1.0, idle_s=0.5)
    assert r["method"].startswith("nvml") and r["energy_j"] > 0 and r["window_s"] >= 1.0


def test_2of4_sparse_kernels_match_dense(tiny_args):
    from compress.prune import n_m_mask
    from runtime.sparse import to_semi_structured

    tiny_args.dim, tiny_args.n_heads, tiny_args.n_kv_heads, tiny_args.multiple_of = 256, 4, 4, 128
    model = Transformer(tiny_args).cuda().half().eval()
    for layer in model.layers:
        for lin in (layer.attention.wq, layer.feed_forward.w1, layer.feed_forward.w2):
            lin.weight.data.masked_fill_(n_m_mask(lin.weight.float().abs()), 0)
    x = torch.randint(0, 97, (8, 64), device="cuda")
    with torch.no_grad():
        dense = model(x).float()
        assert to_semi_structured(model) > 0
        sparse = model(x).float()
    torch.testing.assert_close(sparse, dense, atol=5e-2, rtol=5e-2)


def test_bitsandbytes_nf4_logits_close(tiny_args):
    pytest.importorskip("bitsandbytes")
    from runtime.quantize import quantize

    tiny_args.dim, tiny_args.n_heads, tiny_args.n_kv_heads = 256, 4, 4
    model = Transformer(tiny_args).cuda().eval()
    x = torch.randint(0, 97, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(x)
        out = quantize(model, "bnb-nf4")(x).float()
    assert (out - ref).abs().max() / ref.abs().max() < 0.2


def test_train_step_with_compile_and_bf16(tmp_path, make_config):
    # The same seed, data and initial weights on the CPU in float32 and on the GPU in bf16 + compile: the first
    # loss (before any update) agrees to bf16 precision, and the GPU run learns as the CPU one does.
    import json

    from training.trainer import train

    def losses(root, **kw):
        train(make_config(root, max_steps=12, ckpt_interval=12, eval_interval=12, **kw))
        return [json.loads(line)["loss"] for line in (root / "logs/t/metrics.jsonl").read_text().splitlines()]

    cpu = losses(tmp_path / "cpu", device="cpu")
    gpu = losses(tmp_path / "gpu", device="cuda", compile=True, dtype="bfloat16")
    assert abs(gpu[0] - cpu[0]) < 0.02 * cpu[0], (gpu[0], cpu[0])
    assert gpu[-1] < gpu[0] - 0.5 and abs(gpu[-1] - cpu[-1]) < 0.1 * cpu[-1], (gpu, cpu)
    summary = json.loads((tmp_path / "gpu/logs/t/summary.json").read_text())
    assert summary["compile"] is True and summary["dtype"] == "bfloat16"
    assert summary["energy"]["method"].startswith("nvml")


def test_a_rank_beyond_the_gpus_is_one_clear_error():
    from common.device import pick_device

    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match="one process per GPU"):
        pick_device("auto", local_rank=n)
    assert pick_device("auto", local_rank=n - 1) == torch.device(f"cuda:{n - 1}")


def test_compressed_decode_benchmark_on_the_gpu(tmp_path):
    import json

    import bench.compressed_decode as compressed

    out = tmp_path / "c.json"
    compressed.main(
        ["--config", "tiny_baseline", "--rounds", "3", "--n-tokens", "4", "--batch-sizes", "1", "--context", "32"]
        + ["--modes", "eager", "compile+cudagraphs", "--schemes", "torchao-int8-weight", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    assert r["checks"]["2:4 sparse kernels"]["ok"], r["checks"]  # the sparse kernels reproduce the pruned model
    assert {t["mode"] for t in r["timings"]} == {"eager", "compile+cudagraphs"}
    assert all("dense" in t["models"] for t in r["timings"])


def test_torchao_int4_weight_only_runs_on_the_gpu(tiny_args):
    pytest.importorskip("torchao")
    from runtime.quantize import quantize

    tiny_args.dim, tiny_args.n_heads, tiny_args.n_kv_heads, tiny_args.multiple_of = 256, 4, 4, 128
    tiny_args.vocab_size = 128  # tinygemm takes output sizes in multiples of 8
    model = Transformer(tiny_args).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 128, (2, 16), device="cuda")
    with torch.no_grad():
        ref = model(x).float()
        out = quantize(model, "torchao-int4-weight")(x).float()
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.2
