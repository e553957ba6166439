"""6-layer, ~100M-parameter model, plain Llama-2.

python -m runners.baseline_6_layer                       # one GPU (or CPU, slowly)
torchrun --standalone --nproc_per_node=8 -m runners.baseline_6_layer
"""

from common.cli import run_main
from runners.common import config_100m
from training.trainer import run


def config():
    return config_100m(n_layers=6, per_head=False)


def main():
    run(config())


if __name__ == "__main__":
    run_main(main)
