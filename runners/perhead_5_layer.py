"""5-layer, ~100M-parameter model, with per-head layers (hidden 64, SiLU) on every attention head.

python -m runners.perhead_5_layer                       # one GPU (or CPU, slowly)
torchrun --standalone --nproc_per_node=8 -m runners.perhead_5_layer
"""

from common.cli import run_main
from runners.common import config_100m
from training.trainer import run


def config():
    return config_100m(n_layers=5, per_head=True)


def main():
    run(config())


if __name__ == "__main__":
    run_main(main)
