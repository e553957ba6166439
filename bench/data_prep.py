"""Large-corpus preparation against nanoGPT's FineWeb recipe, side by side on the same local text.

    python -m bench.data_prep                       # ~300 MB of jsonl and parquet made from the standard library
    python -m bench.data_prep --megabytes 100 --rounds 3 --workers 2

The text: the standard library's .py files repeated (each copy renamed) until ``--megabytes``, written once as a
jsonl file and as a parquet file. Both preparations use the same SentencePiece model (trained once, on the
project's stated sample) and the same number of worker processes; each round runs both, in alternating order,
each in a fresh process whose peak memory (its own and its workers', ru_maxrss) is read when it ends:

- ``project``: data/shards.py (``python -m data.shards``): documents streamed, tasks of at most 1M characters
  with at most two per worker in flight, whole-document shards written atomically, resumable.
- ``nanogpt``: nanoGPT's data/fineweb.py as published (multiprocessing ``Pool.imap(tokenize, docs,
  chunksize=16)``, a fixed-size uint16 buffer filled and written shard by shard), with the SentencePiece model
  in place of tiktoken and the same shard size. Written out here (not imported: the script downloads FineWeb).

Reported per format: tokens per second (median and spread over rounds), the ratio project / nanogpt, peak memory,
and both projected to 2B tokens. Writes bench/results/data_prep.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.cli import parse_args, run_main
from common.files import atomic_write
from common.hardware import run_metadata
from common.timing import spread

NANOGPT = r"""
import json, sys, time, multiprocessing as mp
import numpy as np
import pyarrow.parquet as pq
from llama.tokenizer import Tokenizer

path, model, out, shard_size, nprocs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tok = None

def init():
    global tok
    tok = Tokenizer(model)

def tokenize(doc):  # nanoGPT: eot first, then the text's tokens, as uint16
    tokens = [tok.bos_id] + tok.encode(doc, bos=False)
    return np.array(tokens, dtype=np.uint16)

def docs():
    if path.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            yield from batch.column(0).to_pylist()
    else:
        with open(path) as f:
            for line in f:
                yield json.loads(line)["text"]

if __name__ == "__main__":
    total = 0
    with mp.Pool(nprocs, initializer=init) as pool:
        shard_index, all_tokens_np, token_count = 0, np.empty((shard_size,), dtype=np.uint16), 0
        for tokens in pool.imap(tokenize, docs(), chunksize=16):
            total += len(tokens)
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                all_tokens_np.tofile(f"{out}/shard_{shard_index:06d}.bin")
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count:
            all_tokens_np[:token_count].tofile(f"{out}/shard_{shard_index:06d}.bin")
    print(json.dumps({"tokens": total}))
"""


def make_text(folder: Path, megabytes: int) -> dict[str, Path]:
    """The standard library's .py files, copies renamed, until ``megabytes``: as jsonl and as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.config import DataConfig
    from data.prepare import load_documents

    docs = load_documents(DataConfig())
    names, texts, size, copy = [], [], 0, 0
    while size < megabytes * 1e6:
        for d in docs:
            names.append(f"copy{copy}/{d.name}")
            texts.append(d.text)
            size += len(d.text.encode())
        copy += 1
    jsonl = folder / "text.jsonl"
    with open(jsonl, "w") as f:
        for n, t in zip(names, texts, strict=True):
            f.write(json.dumps({"id": n, "text": t}) + "\n")
    parquet = folder / "text.parquet"
    pq.write_table(pa.table({"id": names, "text": texts}), parquet, row_group_size=2048)
    return {"jsonl": jsonl, "parquet": parquet}


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak resident MB of the process and its workers, its stdout) of one command in a fresh process."""
    script = (
        "import resource, subprocess, sys, time, json\n"
        "t0 = time.perf_counter()\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.perf_counter() - t0\n"
        "kb = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 0)\n"
        "print(json.dumps({'s': dt, 'kb': kb, 'rc': p.returncode, 'out': p.stdout[-2000:], 'err': p.stderr[-2000:]}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, env=env)
    r = json.loads(run.stdout)
    if r["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {r['err'][-500:]}")
    return r["s"], r["kb"] / 1024, r["out"]


@dataclass
class Args:
    megabytes: int = 300  # text to prepare, per format
    rounds: int = 3  # each round runs both preparations of both formats, in alternating order
    workers: int = 0  # worker processes of both (0: every core)
    shard_tokens: int = 100_000_000  # nanoGPT's shard size
    vocab_size: int = 32000
    out: str = "bench/results/data_prep.json"


def main(argv=None):
    from data.config import DataConfig
    from data.shards import prepare_shards

    a = parse_args(Args(), argv)
    workers = a.workers or os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    result = {**run_metadata("cpu"), "benchmark": "data_prep", "settings": vars(a) | {"workers": workers}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_text(tmp, a.megabytes)
        # the tokenizer once (the project's stated sample), shared by both
        cfg = DataConfig(corpus=str(files["jsonl"]), vocab_size=a.vocab_size, tokenizer_max_chars=50_000_000)
        first = prepare_shards(cfg, tmp / "first", workers, a.shard_tokens, progress=False)
        model = first.dir / "tokenizer.model"
        (tmp / "nanogpt.py").write_text(NANOGPT)
        for fmt, path in files.items():
            samples = {"project": [], "nanogpt": []}
            for k in range(a.rounds):
                order = ["project", "nanogpt"] if k % 2 == 0 else ["nanogpt", "project"]
                for who in order:
                    out = tmp / f"{fmt}-{who}-{k}"
                    out.mkdir()
                    if who == "project":
                        cmd = [sys.executable, "-m", "data.shards", "--corpus", str(path), "--out", str(out / "p")]
                        cmd += ["--vocab-size", str(a.vocab_size), "--workers", str(workers)]
                        cmd += ["--shard-tokens", str(a.shard_tokens), "--tokenizer-max-chars", "50000000"]
                        shutil_tok(model, out / ".p.partial")  # the same tokenizer: not trained again
                    else:
                        cmd = [sys.executable, str(tmp / "nanogpt.py"), str(path), str(model), str(out)]
                        cmd += [str(a.shard_tokens), str(workers)]
                    seconds, mb, printed = timed(cmd, env)
                    if who == "project":
                        tokens = first.manifest["splits"]["train"]["tokens"] + first.manifest["splits"]["val"]["tokens"]
                    else:  # its own count: one separator per document where ours has two (<s> and </s>)
                        tokens = json.loads(printed.strip().splitlines()[-1])["tokens"]
                    samples[who].append({"seconds": seconds, "peak_mb": mb, "tokens_per_s": tokens / seconds})
            for who, s in samples.items():
                tps = spread([x["tokens_per_s"] for x in s])
                result["rows"].append(
                    {
                        "format": fmt,
                        "preparation": who,
                        "tokens_per_s": tps,
                        "peak_mb": max(x["peak_mb"] for x in s),
                        "hours_for_2B_tokens": 2e9 / tps["median"] / 3600,
                        "rounds": s,
                    }
                )
            ratios = [
                p["tokens_per_s"] / n["tokens_per_s"]
                for p, n in zip(samples["project"], samples["nanogpt"], strict=True)
            ]
            result["rows"].append({"format": fmt, "ratio_project_over_nanogpt": spread(ratios)})
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(a.out, json.dumps(result, indent=2))
    print(table(result))
    print(f"-> {a.out}")


def shutil_tok(model: Path, stage: Path):
    """Start a preparation with the shared tokenizer in its staging folder (it then trains none)."""
    import shutil

    stage.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, stage / "tokenizer.model")


def table(result: dict) -> str:
    lines = [
        "| format | preparation | tokens/s (median, p10-p90) | peak memory MB | hours for 2B tokens |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "preparation" in r:
            t = r["tokens_per_s"]
            lines.append(
                f"| {r['format']} | {r['preparation']} | {t['median']:,.0f} ({t['p10']:,.0f}-{t['p90']:,.0f}) | "
                f"{r['peak_mb']:,.0f} | {r['hours_for_2B_tokens']:.2f} |"
            )
        else:
            q = r["ratio_project_over_nanogpt"]
            lines.append(
                f"| {r['format']} | project / nanogpt | x{q['median']:.2f} ({q['p10']:.2f}-{q['p90']:.2f}) | | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
