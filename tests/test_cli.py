"""The one command-line layer (common/cli.py) and every command built on it."""

import importlib
import sys
import typing
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.cli import ConfigError, apply_overrides, positional

COMMANDS = [
    "llama.convert",
    "data.prepare",
    "runners.tiny",
    "runners.tiny_baseline",
    "runners.baseline_5_layer",
    "runners.perhead_8_layer",
    "runners.study",
    "eval.perplexity",
    "eval.quality",
    "eval.humaneval",
    "eval.efficiency",
    "compress.__main__",
    "visualizations.compare",
    "visualizations.plot_tradeoffs",
    "visualizations.plot_training",
    "bench.train_throughput",
    "bench.decode_latency",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_has_help_from_the_one_layer(module, capsys, monkeypatch):
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m") and "options" in out
    assert "\n  --" in out or "\n  SOURCE" in out  # options (or convert's positionals), listed by the layer


@pytest.mark.parametrize("module", ["eval.perplexity", "eval.efficiency", "runners.study", "visualizations.compare"])
def test_unknown_keys_are_errors_everywhere(module, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module, "x", "--no-such-key", "1"])
    with pytest.raises(ConfigError, match="unknown config key --no-such-key"):
        importlib.import_module(module).main()


@dataclass
class Inner:
    width: int = 4  # an inner size
    mode: Literal["a", "b"] = "a"  # a choice


@dataclass
class Opts:
    path: str = positional()  # where
    sizes: list[int] = field(default_factory=lambda: [1])  # several values
    inner: Inner | None = field(default_factory=Inner)  # optional part
    energy: bool = True  # a switch
    rate: float | None = None  # optional number


def test_types_lists_choices_negation_and_positionals():
    o = apply_overrides(Opts(), ["here", "--sizes", "1", "8", "32", "--width", "6", "--mode", "b", "--no-energy"])
    assert (o.path, o.sizes, o.inner.width, o.inner.mode, o.energy, o.rate) == ("here", [1, 8, 32], 6, "b", False, None)
    assert apply_overrides(Opts(), ["--rate=0.5", "p", "--inner.width", "2"]).inner.width == 2
    assert apply_overrides(Opts(), ["p", "--no-inner"]).inner is None
    with pytest.raises(ConfigError, match="must be one of a, b"):
        apply_overrides(Opts(), ["p", "--mode", "c"])
    with pytest.raises(ConfigError, match="expects int"):
        apply_overrides(Opts(), ["p", "--sizes", "1", "x"])
    with pytest.raises(ConfigError, match="missing PATH"):
        apply_overrides(Opts(), ["--width", "3"])
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        apply_overrides(Opts(), ["p", "extra"])
    with pytest.raises(ConfigError, match="only a true/false option or an optional part"):
        apply_overrides(Opts(), ["p", "--no-width"])


def test_command_help_names_the_command(capsys):
    from eval.perplexity import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m eval.perplexity") and "sliding window" in out and "CHECKPOINT" in out
    assert "--stride" in out and "must be below context" in out and "--corpus" in out


def test_help_shows_each_fields_comment(capsys):
    with pytest.raises(SystemExit):
        apply_overrides(Opts(), ["--help"])
    out = capsys.readouterr().out
    assert "--sizes" in out and "several values" in out and "PATH" in out and "a choice" in out


def test_no_head_layer_turns_a_runner_into_its_baseline():
    from runners import tiny, tiny_baseline

    cfg = apply_overrides(tiny.config(), ["--no-head-layer", "--name", "b"])
    assert cfg.model.head_layer is None and cfg.model == tiny_baseline.config().model


def test_a_failure_is_one_line_even_without_a_message():
    from common.cli import failure

    assert failure(ValueError("first line\nsecond")) == "ValueError: first line"
    assert failure(AssertionError()) == "AssertionError"  # no message: the type alone, not an IndexError
    assert failure(RuntimeError("x" * 500), 200) == "RuntimeError: " + "x" * 200


def test_only_known_noise_is_silenced(caplog):
    import logging

    from common.cli import silence_known_noise

    silence_known_noise()
    silence_known_noise()  # twice: one filter each
    assert len(logging.getLogger("torchao").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchao").warning("Failed to load /x/_C_cutlass_90a.abi3.so: Could not load")
        logging.getLogger("torchao").warning("a torchao warning that matters")
        logging.getLogger("torch.onnx._internal.exporter._registration").warning("torchvision is not installed. x")
    assert [r.getMessage() for r in caplog.records] == ["a torchao warning that matters"]


RANGED_COMMANDS = ["eval.quality", "eval.perplexity", "eval.humaneval", "eval.induction", "eval.harness",
                   "eval.efficiency", "eval.side_by_side", "runners.study", "runners.serve_compare",
                   "bench.batched_serving"]  # fmt: skip


def _ranged_fields(options) -> list:
    """(field, its type) of every ranged option of ``options``, nested parts included."""
    import dataclasses

    out = []
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            out += _ranged_fields(value)
        elif "range" in f.metadata:
            out.append((f, hints[f.name]))
    return out


@pytest.mark.parametrize("command", RANGED_COMMANDS)
def test_every_ranged_option_refuses_a_value_out_of_its_range_in_one_line(command):
    """Counts below 1 were read as "all" (--humaneval-limit 0 ran all 164 problems, --max-tokens 0 scored the whole
    split) or cut from the end (a negative limit): the number options of every evaluator, the study and the
    serving comparisons say their range, the command line refuses a value outside it before any work, and --help
    prints it."""
    from common.cli import overrides_help

    cls = importlib.import_module(command).Args
    args = (lambda: cls(checkpoint="x")) if "checkpoint" in cls.__dataclass_fields__ else cls
    options = args()
    ranged = _ranged_fields(options)
    assert ranged, f"{command} declares no ranged option"
    for f, tp in ranged:
        low, high, above = f.metadata["range"]
        flag = "--" + f.name.replace("_", "-")
        bad = ([low if above else low - 1] if low is not None else []) + ([high + 1] if high is not None else [])
        bad += ["nan"] if float in (tp, *typing.get_args(tp)) else []  # NaN is inside no range
        for value in bad:
            fresh = args()
            with pytest.raises(ConfigError, match=rf"^{flag} \S+: must be (above|at least|at most) ") as refused:
                apply_overrides(fresh, [flag, str(value)])
            said = str(refused.value).split(": must be ")[1].split(" (")[0]  # the range, as the refusal words it
            [line] = [x for x in overrides_help(options).splitlines() if x.split()[:1] == [flag]]
            assert line.endswith(said)  # --help prints the same range beside the option
        fresh = args()
        apply_overrides(fresh, [flag, str(low + 1 if low is not None else high)])  # inside the range: taken


def test_a_humaneval_limit_below_one_is_refused_not_read_as_all():
    from data.humaneval import load_problems

    assert len(load_problems()) == 164 and len(load_problems(3)) == 3
    for limit in (0, -3):
        with pytest.raises(ValueError, match=f"HumanEval limit of {limit}: give a number of problems, at least 1"):
            load_problems(limit)
