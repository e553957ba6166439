"""The embedded default: a small per-head Llama trained on the Python standard library on CPU in minutes.

python -m runners.tiny                          # per-head layers on
python -m runners.tiny_baseline                 # the same without them (= --name tiny_baseline --no-head-layer)
"""

from data.config import DataConfig
from llama.model import HeadLayerArgs, ModelArgs
from runners.common import runner_main
from training.config import OptimConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        name="tiny",
        model=ModelArgs(
            dim=128,
            n_layers=4,
            n_heads=4,
            max_seq_len=256,
            head_layer=HeadLayerArgs(),
        ),
        data=DataConfig(vocab_size=4096),
        optim=OptimConfig(lr=2e-3, warmup_steps=30, weight_decay=0.1),
        max_steps=300,
        batch_size=16,
        seq_len=256,
        eval_interval=100,
        eval_iters=10,
        log_interval=10,
        ckpt_interval=100,
        keep_last=3,
        device="cpu",
    )


main = runner_main(config)

if __name__ == "__main__":
    main()
