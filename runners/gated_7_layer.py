"""7 blocks, ~100M parameters, gated attention (Qiu et al., 2025: an elementwise sigmoid gate on each head's output).

python -m runners.gated_7_layer                                    # one GPU
torchrun --standalone --nproc_per_node=8 -m runners.gated_7_layer  # DDP (--parallel fsdp: FSDP2)
"""

from runners.common import hundred_m

config, main = hundred_m(n_layers=7, per_head=False, gate=True)

if __name__ == "__main__":
    main()
