"""lm-evaluation-harness's own command line, with this project's model registered as ``perhead-llama``:

    python -m eval.lm_eval_cli run --model perhead-llama --model_args checkpoint=checkpoints/tiny --tasks ...

Any ``--model_args checkpoint=`` takes what every evaluator takes: a checkpoints/<run> folder, a model folder
or a Hugging Face model folder (see eval/lm_eval_model.py).
"""

from lm_eval.__main__ import cli_evaluate

import eval.lm_eval_model  # noqa: F401  (registers the model with lm-eval)
from common.cli import UserError, run_main


def main():
    try:
        cli_evaluate()
    except ValueError as e:  # lm-eval's own words for a bad command line (unknown task or model)
        if isinstance(e, UserError):
            raise
        raise UserError(f"lm-eval: {e}") from e


if __name__ == "__main__":
    run_main(main)  # bad --model_args, a missing checkpoint, unknown tasks: one line, not a traceback
