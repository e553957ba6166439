"""Tiny random-weight Hugging Face models of each supported architecture, with a byte-level BPE tokenizer
trained here on a few standard-library files: everything the HF tests need, built offline."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "gpt_neox", "gpt2", "starcoder2")


def _texts():
    folder = Path(json.__file__).parent  # the json package's own sources
    return [p.read_text() for p in sorted(folder.glob("*.py"))]


def build_tokenizer(with_bos: bool):
    """A 400-token byte-level BPE; ``with_bos`` adds a <s> the tokenizer puts before every text (as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>"] if with_bos else [])
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(_texts(), trainer)
    if with_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    bos = "<s>" if with_bos else "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token=bos)


def config(arch: str, vocab: int, n_layers: int = 3):
    import transformers as T

    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    if arch == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, n_positions=128, **common)
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": n_layers, "num_attention_heads": 4}
    sizes["max_position_embeddings"] = 128
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(**sizes, **common)
    cls = {"llama": T.LlamaConfig, "starcoder2": T.Starcoder2Config}[arch]
    return cls(**sizes, num_key_value_heads=2, **common)


def make_hf_model(arch: str, folder: Path, seed: int = 0, n_layers: int = 3) -> Path:
    """save_pretrained of a random-weight ``arch`` model and its tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(with_bos=arch == "llama")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, len(tok), n_layers)).eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def write_local_tasks(folder: Path, rows: list[dict], prefix: str) -> Path:
    """Three lm-eval tasks over ``rows`` (question, choices, answer, text) in ``folder``, read from a local
    JSONL file: <prefix>_mc (multiple choice), <prefix>_rolling (rolling loglikelihood), <prefix>_gen."""
    import textwrap

    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'data.jsonl'}\ntest_split: test\n"
    )
    specs = {
        "mc": """\
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: "{{answer}}"
            metric_list:
              - metric: acc
              - metric: acc_norm
            """,
        "rolling": """\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            """,
        "gen": """\
            output_type: generate_until
            doc_to_text: "{{question}}"
            doc_to_target: "{{choices[answer]}}"
            generation_kwargs:
              until: ["\\n\\n"]
              max_gen_toks: 6
              do_sample: false
            metric_list:
              - metric: exact_match
            """,
    }
    for name, spec in specs.items():
        (folder / f"{name}.yaml").write_text(f"task: {prefix}_{name}\n" + common + textwrap.dedent(spec))
    return folder
