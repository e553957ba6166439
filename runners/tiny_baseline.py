"""runners/tiny.py without per-head layers: plain Llama-2 at the same size, for side-by-side comparisons.

python -m runners.tiny_baseline
"""

import dataclasses

from runners import tiny
from runners.common import runner_main


def config():
    cfg = tiny.config()
    cfg.name, cfg.model = "tiny_baseline", dataclasses.replace(cfg.model, head_layer=None)
    return cfg


main = runner_main(config)

if __name__ == "__main__":
    main()
