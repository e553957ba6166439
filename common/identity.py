"""What made an output: the resolved options of the command that wrote it, in a JSON-normal form, recorded inside
the output (a result, a compressed model's compression.json) so that a study reuses an output only when the
command it would run now resolves to the same options, however the study's markers or logs were edited. Options
are compared after parsing, so ``--max_tokens=5``, ``--max-tokens 5`` and the default spelled out are one."""

from __future__ import annotations

import dataclasses
import json


def options_identity(options, drop: tuple[str, ...] = ()) -> dict:
    """``options`` (a dataclass of a command's options) as a JSON object, without the fields in ``drop`` (where
    the output goes, which model: what does not shape the figures)."""
    d = dataclasses.asdict(options)
    for key in drop:
        d.pop(key, None)
    return json.loads(json.dumps(d, default=str, sort_keys=True))
