import json

from eval.quality import main


def test_quality_command_on_a_trained_checkpoint(trained_checkpoint, tmp_path, capsys, sandbox):
    out = tmp_path / "q.json"
    main(
        [
            str(trained_checkpoint),
            "--max-tokens",
            "3000",
            "--n-docs",
            "3",
            "--prompt-tokens",
            "8",
            "--continuation-tokens",
            "8",
            "--humaneval-limit",
            "3",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    assert r["model"] == "t@step_30" and r["per_head"] is True
    for key in ("git_commit", "device", "torch_version"):
        assert r[key]
    ppl = r["perplexity"]
    assert ppl["tokens_scored"] <= 2999 and "whole documents" in ppl["sample"]  # drawn across the split
    assert 1 < ppl["perplexity"] < 500 and ppl["bits_per_byte"] > 0
    assert ppl["context"] == 32 and ppl["stride"] == 16
    assert r["continuation"]["pairs"] == 2 and 0 <= r["continuation"]["bleu"] <= 100
    he = r["humaneval"]
    assert he["pass"]["problems"] == 3 and 0 <= he["pass"]["pass@1"] <= 1
    assert he["prompts_truncated"] == 3  # HumanEval prompts do not fit a 32-token context: said, not hidden
    assert "perplexity" in capsys.readouterr().out
