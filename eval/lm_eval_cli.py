"""lm-evaluation-harness's own command line, with this project's model registered as ``perhead-llama``:

    python -m eval.lm_eval_cli run --model perhead-llama --model_args checkpoint=checkpoints/tiny --tasks ...

Any ``--model_args checkpoint=`` takes what every evaluator takes: a checkpoints/<run> folder, a model folder
or a Hugging Face model folder (see eval/lm_eval_model.py).
"""

from lm_eval.__main__ import cli_evaluate

import eval.lm_eval_model  # noqa: F401  (registers the model with lm-eval)
from common.cli import run_main

if __name__ == "__main__":
    run_main(cli_evaluate)  # bad --model_args, a missing checkpoint, unknown tasks: one line, not a traceback
