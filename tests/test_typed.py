"""The one reader of records (common.typed.from_record): every field read by its type and its ``figure``, wherever
it sits, with one line naming where a bad value sits; and every typed record of the project read through it."""

import dataclasses
import json
import math
from dataclasses import dataclass

import pytest

from common import records, results
from common.typed import SELF, Record, figure


@dataclass(frozen=True)
class Inner(Record):
    median: float = figure(low=0.0)
    n: int = figure()


@dataclass(frozen=True)
class Outer(Record):
    name: str
    inner: Inner
    rows: tuple[Inner, ...] = figure("many", default=())
    by: dict[str, Inner] = dataclasses.field(default_factory=dict)
    deep: float | None = figure(("table", "value"), high=1.0, default=None)
    whole: Inner | None = figure(SELF, when="median", default=None)
    flag: bool = False
    bound: float | None = figure(low=0.0, infinite=True, default=None)

    @classmethod
    def older(cls, d):
        return {"name": "old"} | d


GOOD = {"inner": {"median": 1.5, "n": 3}, "many": [{"median": 0.0, "n": 0}], "by": {"a": {"median": 2, "n": 1}}}


def test_fields_are_read_from_their_keys_paths_and_the_record_itself():
    o = Outer.of(GOOD | {"table": {"value": 0.25}, "median": 4.0, "n": 2, "flag": True, "extra": [1, 2]})
    assert o == Outer("old", Inner(1.5, 3), (Inner(0.0, 0),), {"a": Inner(2.0, 1)}, 0.25, Inner(4.0, 2), True)
    assert isinstance(o.by["a"].median, float)  # a whole number where a float belongs reads as that float
    bare = Outer.of(GOOD)  # optional parts absent: their defaults; "when" absent: None; a null table: absent
    assert (bare.deep, bare.whole, bare.flag) == (None, None, False)
    assert Outer.of(GOOD | {"table": None}).deep is None
    assert Outer.of(None) is None
    assert Outer.of(GOOD | {"bound": math.inf}).bound == math.inf  # an unbounded interval's end


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"inner": {"median": math.nan, "n": 3}}, r"^inner.median = nan is not a finite number in \[0.0, inf\]$"),
        ({"inner": {"median": -1, "n": 3}}, r"^inner.median = -1 is not a finite number in \[0.0, inf\]$"),
        ({"inner": {"median": "1", "n": 3}}, r"^inner.median = '1' is not a number$"),
        ({"inner": {"median": True, "n": 3}}, r"^inner.median = True is not a number$"),
        ({"inner": {"median": 1, "n": 2.0}}, r"^inner.n = 2.0 is not a count"),
        ({"inner": {"median": 1, "n": -1}}, r"^inner.n = -1 is not a count"),
        ({"inner": {"median": 1, "n": False}}, r"^inner.n = False is not a count"),
        ({"many": [{"median": 0, "n": 0}, {"median": 1e400, "n": 0}]}, r"^many\[1\].median = inf is not a finite"),
        ({"many": {"median": 0, "n": 0}}, r"^many = .* is not a list$"),
        ({"by": {"a": {"median": 1, "n": 1.5}}}, r"^by.a.n = 1.5 is not a count"),
        ({"table": {"value": 2.0}}, r"^table.value = 2.0 is not a finite number in \[-inf, 1.0\]$"),
        ({"median": 1.0, "n": "x"}, r"^n = 'x' is not a count"),
        ({"name": 3}, r"^name = 3 is not a string$"),
        ({"flag": 1}, r"^flag = 1 is not true or false$"),
        ({"inner": [1.0, 3]}, r"^inner = \[1.0, 3\] is not a table$"),
        ({"bound": math.nan}, r"^bound = nan is not a finite number in \[0.0, inf\]$"),
    ],
)
def test_a_bad_value_is_one_line_naming_where_it_sits(edit, message):
    with pytest.raises(ValueError, match=message) as e:
        Outer.of(GOOD | edit)
    assert "\n" not in str(e.value)


def test_a_missing_key_names_the_key():
    with pytest.raises(KeyError, match="inner"):
        Outer.of({})
    with pytest.raises(KeyError, match="'n'"):
        Outer.of(GOOD | {"inner": {"median": 1.0}})
    with pytest.raises(KeyError, match="'n'"):  # read from the record itself where its key is there
        Outer.of(GOOD | {"median": 1.0})


def test_every_typed_record_of_the_project_is_read_by_its_fields():
    """No record class keeps a reader of its own: each is read by from_record, through Record.of (Compression's
    only adds that an empty record is no compression)."""
    found = {c for m in (results, records) for c in vars(m).values() if isinstance(c, type) and issubclass(c, Record)}
    classes = found - {Record}
    assert len(classes) >= 20
    for c in classes:
        own = c.__dict__.get("of")
        assert own is None or c is results.Compression, f"{c.__name__} reads itself by hand"


def test_a_result_reads_the_same_through_json_as_built(tmp_path):
    spread = {"median": 2.0, "p10": 1.0, "p90": 3.0, "n": 5}
    record = {
        "evaluator": "efficiency", "model": "m", "checkpoint": "ck/m", "params": 10, "n_layers": 2,
        "architecture": "perhead-llama", "device": "cpu (2 threads)", "torch_version": "2", "git_commit": "abc",
        "prefill": [{"mode": "eager", "batch": 1, "ms": spread}],
        "decode": [{"mode": "eager", "batch": 1, "ms_per_token": spread, "energy": {"method": "unavailable"}}],
    }  # fmt: skip
    r = results.parse_result(json.loads(json.dumps(record)))
    assert r.identity == results.ModelIdentity("m", "ck/m", 10, 2, "perhead-llama")
    assert r.prefill[0].ms == r.decode[0].ms == results.Spread(2.0, 1.0, 3.0, 5) and r.device_threads == 2
    assert r.decode[0].energy.figure == "unavailable" and r.record is not None
    with pytest.raises(ValueError, match=r"decode\[0\].ms_per_token.p90 = -3.0 is not a finite number"):
        bad = json.loads(json.dumps(record))
        bad["decode"][0]["ms_per_token"]["p90"] = -3.0
        results.parse_result(bad)
    older = {k: v for k, v in record.items() if k not in ("checkpoint", "params", "n_layers", "architecture")}
    assert results.parse_result(older | {"per_head": True}).identity.head_layer == {}  # written by older code


def test_a_result_whose_compression_record_is_damaged_is_refused_naming_it():
    header = {"evaluator": "humaneval", "model": "m", "checkpoint": "ck/m", "params": 1, "n_layers": 1}
    figures = {"pass": {"pass@1": 0.5, "problems": 2}}
    ok = {"method": "wanda", "sparsity": 0.5, "base_compression": {"method": "drop-bi", "layers": 1}}
    assert results.parse_result(header | figures | {"compression": ok}).identity.compression == ok
    assert results.Compression.of(ok).base.layers == 1
    for bad, where in (({"method": 3}, "compression.method"), (ok | {"sparsity": "half"}, "compression.sparsity")):
        with pytest.raises(ValueError, match=f"{where} = .* is not"):
            results.parse_result(header | figures | {"compression": bad})


def test_a_key_path_whose_keys_repeat_reads_each_level():
    @dataclass(frozen=True)
    class Twice(Record):
        value: float | None = figure(("a", "a"), default=None)

    assert Twice.of({"a": {"a": 2.0}}).value == 2.0
    assert Twice.of({"a": None}).value is None  # a null table on the way: absent
    assert Twice.of({"a": {"a": None}}).value is None  # null at the end: the value null
    with pytest.raises(ValueError, match=r"^a.a = 'x' is not a number$"):
        Twice.of({"a": {"a": "x"}})
