"""The benchmarks run end to end on the CPU at toy sizes (their GPU runs use the same code with other defaults)."""

import json

import pytest
import torch

import bench.compressed_decode as compressed
import bench.decode_latency as decode_latency
import bench.train_throughput as train_throughput


def test_train_throughput_interleaves_models_and_compares_per_head_to_its_baseline(tmp_path):
    out = tmp_path / "t.json"
    train_throughput.main(
        ["--configs", "tiny_baseline", "tiny", "--rounds", "3", "--steps-per-round", "1", "--warmup", "1"]
        + ["--batch-size", "2", "--device", "cpu", "--profile", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    rows = {row["config"]: row for row in r["rows"]}
    assert set(rows) == {"tiny_baseline", "tiny"} and rows["tiny"]["per_head"] and not rows["tiny_baseline"]["per_head"]
    for row in rows.values():
        assert row["rounds"] == 3 and row["tokens_per_s"]["median"] > 0 and row["mfu"] is None  # no CPU peak
        assert row["profile"] and 0 < sum(op["share"] for op in row["profile"]) <= 1.0 + 1e-9
    (cost,) = r["per_head_cost"]
    assert (cost["per_head"], cost["baseline"]) == ("tiny", "tiny_baseline")
    assert cost["time_per_token_ratio"]["n"] == 3 and cost["time_per_token_ratio"]["median"] > 0


def test_train_throughput_refuses_too_few_rounds():
    with pytest.raises(ValueError, match="--rounds"):
        train_throughput.main(["--rounds", "2"])


def test_decode_latency_writes_every_decode_row_with_its_energy(tmp_path):
    out = tmp_path / "d.json"
    decode_latency.main(
        ["--configs", "tiny", "--batch-sizes", "1", "2", "--modes", "eager", "--n-tokens", "4", "--repeats", "2"]
        + ["--engines", "torch", "--device", "cpu", "--out", str(out)]
    )
    (row,) = json.loads(out.read_text())["rows"]
    assert [d["batch"] for d in row["decode"]] == [1, 2] and row["context_len"] == 128
    for d in row["decode"]:
        assert d["repeats"] == 2 and d["n_tokens"] == 4 and d["ms_per_token"]["median"] > 0
        assert d["energy"]["method"] in ("unavailable", "rapl")  # never a made-up figure
    assert [f["engine"] for f in row["forward"]] == ["torch", "torch"]


def test_decode_table_shows_each_energy_run_and_flags_a_spread_over_the_tolerance():
    def decode(batch, runs):
        e = {"method": "nvml-energy", "tolerance": 0.05, "net_j_per_token_runs": runs}
        e["net_j_per_token_spread"] = (max(runs) - min(runs)) / sorted(runs)[1]
        ms = {"median": 0.2, "p10": 0.19, "p90": 0.25}
        return {"mode": "compile+cudagraphs", "batch": batch, "ms_per_token": ms, "tokens_per_s": 5000.0, "energy": e}

    text = decode_latency.decode_table(
        [{"config": "c", "decode": [decode(1, [1.0, 1.01, 1.02]), decode(16, [1, 1.1, 1])]}]
    )
    lines = text.splitlines()[2:]
    assert "| 200 | 190-250 |" in lines[0] and "1.0000, 1.0100, 1.0200" in lines[0] and "2.0%" in lines[0]
    assert "(over)" not in lines[0] and "10.0% (over)" in lines[1]


class _Const(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, tokens):
        return self.out


def test_output_check_passes_the_same_function_and_fails_nan_and_far_outputs():
    ref = torch.randn(2, 8, 50)
    models = {
        "dense": _Const(ref),
        "2:4 sparse kernels": _Const(ref * (1 + 1e-3)),
        "close": _Const(ref + 0.01 * torch.randn_like(ref)),
        "nan": _Const(torch.full_like(ref, float("nan"))),
        "far": _Const(torch.randn_like(ref)),
    }
    refs = dict.fromkeys(models, "dense")
    c = compressed.check_outputs(models, refs, torch.zeros(2, 8, dtype=torch.long))
    assert c["dense"]["ok"] and c["dense"]["rel_error"] == 0 and c["dense"]["top1_agreement"] == 1
    assert c["2:4 sparse kernels"]["ok"] and c["2:4 sparse kernels"]["bound"] == compressed.SPARSE_TOLERANCE
    assert c["close"]["ok"] and not c["nan"]["ok"] and not c["far"]["ok"]


def test_compressed_decode_checks_every_variant_and_times_the_ones_that_pass(tmp_path):
    out = tmp_path / "c.json"
    compressed.main(
        ["--rounds", "3", "--n-tokens", "2", "--batch-sizes", "1", "--context", "16", "--device", "cpu"]
        + ["--schemes", "int8-dynamic", "bnb-nf4", "--out", str(out)]
    )
    r = json.loads(out.read_text())
    assert "CUDA" in r["unavailable"]["2:4 sparse kernels"] and "CUDA" in r["unavailable"]["bnb-nf4"]
    checks = r["checks"]
    assert checks["dense"]["rel_error"] == 0 and checks["2:4 pruned"]["rel_error"] > 0  # pruning changes the model
    assert checks["int8-dynamic"]["ok"] and 0 < checks["int8-dynamic"]["rel_error"] < 0.2
    (run,) = r["timings"]
    assert set(run["models"]) == {"dense", "2:4 pruned", "int8-dynamic"} and run["reference"] == "dense"
    assert run["models"]["int8-dynamic"]["decode_ratio_to_reference"]["n"] == 3
    assert r["memory_bytes"]["int8-dynamic"] < r["memory_bytes"]["dense"]


def _hardware_module_in(root):
    """common/hardware.py copied into ``root``/common and imported from there (git_commit looks at ``root``)."""
    import importlib.util
    import shutil
    from pathlib import Path

    import common.hardware

    copy = root / "common" / "hardware.py"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(common.hardware.__file__), copy)
    spec = importlib.util.spec_from_file_location(f"hardware_in_{root.name}", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_commit_of_a_tree_copied_without_git_comes_from_the_environment(tmp_path, monkeypatch):
    import common.hardware

    module = _hardware_module_in(tmp_path)  # the tree as a remote machine gets it: files, no .git
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert module.git_commit() == "abc123"
    assert common.hardware.git_commit() != "abc123"  # in the checkout git itself answers


@pytest.mark.slow
def test_the_gpu_call_script_runs_its_steps_and_collects_their_files(tmp_path):
    # The script a lent GPU machine runs, in its CPU smoke mode: every step ends, its files land in $OUT.
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SMOKE": "1", "PYTHON": sys.executable, "GIT_COMMIT": "c0ffee"}
    r = subprocess.run(
        ["bash", "bench/gpu/call.sh", "train", "decode"], env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    header, steps = (out / "steps.txt").read_text().split("steps:\n")
    steps = steps.splitlines()
    assert [s.split(":")[0] for s in steps] == ["train_throughput", "decode_latency", "compressed_decode", "pytest_bnb"]
    assert all(": exit 0 " in s for s in steps), steps
    for name in ("train_throughput", "decode_latency", "compressed_decode"):
        assert json.loads((out / f"{name}.json").read_text())["benchmark"] == name
    assert "commit c0ffee" in header and "torch" in header
    log = (out / "log.txt").read_text()
    assert "=== train_throughput:" in log and "=== pytest_bnb:" in log
    assert len(list(out.iterdir())) <= 8  # what comes back from one call
    bad = subprocess.run(["bash", "bench/gpu/call.sh", "nonsense"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown part nonsense" in bad.stderr


def test_a_rewritten_result_file_does_not_mark_the_code_dirty(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    module = _hardware_module_in(repo)
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "bench" / "results" / "r.json").write_text("{}")
    (repo / "eval").mkdir()
    (repo / "eval" / "m.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    clean = module.git_commit()
    assert len(clean) == 40
    (repo / "bench" / "results" / "r.json").write_text('{"new": 1}')  # a benchmark rewrote its result
    assert module.git_commit() == clean
    (repo / "eval" / "m.py").write_text("x = 2\n")  # code anywhere in the tree, not beside this module
    assert module.git_commit() == clean + "+dirty"


def test_the_decode_loop_benchmark_compares_with_transformers_generate(tmp_path):
    # a run that checks its engines generate transformers' own tokens, then times them side by side
    import json

    from bench.decode_loop import main

    out = tmp_path / "dl.json"
    argv = ["--dim", "32", "--n-heads", "4", "--vocab-size", "300", "--max-seq-len", "64", "--prompt-len", "8"]
    main(argv + ["--n-tokens", "4", "--rounds", "3", "--warmup", "1", "--engines", "torch", "--out", str(out)])
    r = json.loads(out.read_text())
    assert set(r["engines"]) == {"transformers", "torch"} and len(r["engines"]["torch"]["samples"]) == 3
    ratio = r["engines"]["torch"]["ratio_to_transformers"]
    assert ratio["test"].startswith("wilcoxon") and r["engines"]["torch"]["target"] == 1.0


def test_the_lm_eval_bench_items_hold_the_true_next_line_among_four():
    from bench.lm_eval_adapter import corpus

    rolling, items = corpus(3, 10)
    assert len(rolling) == 3 and all(0 < len(r["text"]) <= 3000 for r in rolling)
    assert len(items) == 10 and all(len(i["choices"]) == 4 and 0 <= i["answer"] < 4 for i in items)
    assert corpus(3, 10) == (rolling, items)  # the same tasks every run


def test_the_batching_benchmark_pairs_rounds_and_says_when_answers_differ():
    """The table pairs each round's batched run with the same round's one-at-a-time run: the speedup is their
    ratio (median, min, max over rounds), and any answer that differs between the two servers is flagged."""
    from bench.batched_serving import markdown, table_rows

    def run(r, mb, tps, texts):
        return {"concurrency": 8, "round": r, "engine": "torch", "max_batch": mb, "ok": 16, "requests": 16,
                "tokens_per_s": tps, "ttft_ms_p50": 10.0, "tpot_ms_p50": 2.0, "guidellm_tpot_ms_p50": 1.9,
                "j_per_token": None, "energy_reason": "no counter", "texts": texts}  # fmt: skip

    runs = [run(0, 1, 100.0, ["a"]), run(0, 16, 400.0, ["a"]), run(1, 16, 250.0, ["a"]), run(1, 1, 50.0, ["a"])]
    [row] = table_rows(runs, 16)
    assert row["speedup_median"] == pytest.approx(4.5) and row["speedup_min"] == pytest.approx(4.0)
    assert row["speedup_max"] == pytest.approx(5.0) and row["answers_equal"] is True
    assert row["tokens_per_s_one"] == pytest.approx(75.0) and row["tokens_per_s_batched"] == pytest.approx(325.0)
    assert "| torch | 8 | 75 | 325 | x4.50 [4.00, 5.00] |" in markdown([row], 16)
    runs[1]["texts"] = ["b"]
    [row] = table_rows(runs, 16)
    assert row["answers_equal"] is False and markdown([row], 16).rstrip().endswith("| NO |")
