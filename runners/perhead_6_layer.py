"""6-layer, ~100M-parameter model, with per-head layers (hidden 64, SiLU) on every attention head.

python -m runners.perhead_6_layer                       # one GPU (or CPU, slowly)
torchrun --standalone --nproc_per_node=8 -m runners.perhead_6_layer
"""

from runners.common import config_100m, runner_main


def config():
    return config_100m(n_layers=6, per_head=True)


main = runner_main(config)

if __name__ == "__main__":
    main()
