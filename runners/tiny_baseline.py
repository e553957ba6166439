"""runners/tiny.py without per-head layers: plain Llama-2 at the same size, for side-by-side comparisons.

python -m runners.tiny_baseline
"""

import dataclasses

from common.cli import run_main
from runners import tiny
from training.trainer import run


def config():
    cfg = tiny.config()
    cfg.name, cfg.model = "tiny_baseline", dataclasses.replace(cfg.model, head_layer=None)
    return cfg


def main():
    run(config())


if __name__ == "__main__":
    run_main(main)
