"""5 blocks, ~100M parameters, per-head layers (hidden 64, SiLU).

python -m runners.perhead_5_layer                                    # one GPU
torchrun --standalone --nproc_per_node=8 -m runners.perhead_5_layer  # DDP (--parallel fsdp: FSDP2)
"""

from runners.common import hundred_m

config, main = hundred_m(n_layers=5, per_head=True)

if __name__ == "__main__":
    main()
