"""6 blocks, ~100M parameters, plain Llama-2.

python -m runners.baseline_6_layer                                    # one GPU
torchrun --standalone --nproc_per_node=8 -m runners.baseline_6_layer  # DDP (--parallel fsdp: FSDP2)
"""

from runners.common import hundred_m

config, main = hundred_m(n_layers=6, per_head=False)

if __name__ == "__main__":
    main()
