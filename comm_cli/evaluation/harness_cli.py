"""`comm-lm-eval`: lm-evaluation-harness's own command line, with comm's model registered.

lm-eval 0.4.x looks models up only in its own registry (it reads no entry points of other
packages), so ``lm_eval --model comm`` cannot find comm. This command imports
``comm_cli.evaluation.harness`` (which registers ``comm``) and hands the arguments to lm-eval:

    comm-lm-eval --model comm --model_args checkpoint=outputs/run/composition --tasks arc_easy
    comm-lm-eval --model comm --model_args model=anchor,anchor=Qwen/Qwen2.5-1.5B --tasks gsm8k
    comm-lm-eval --model comm --model_args checkpoint=DIR,bridges_off=true --tasks hellaswag
"""

from __future__ import annotations

import sys

from comm_cli.cli import EXIT_USER_ERROR, run_reporting_errors

PROGRAM = "comm-lm-eval"


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate

        import comm_cli.evaluation.harness  # noqa: F401  (registers --model comm)
    except ImportError as err:
        if (err.name or "").split(".")[0] != "lm_eval":
            raise
        print(
            f"{PROGRAM}: error: lm-evaluation-harness is not installed: pip install 'comm-cli[harness]'",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_USER_ERROR)
    run_reporting_errors(PROGRAM, cli_evaluate)


if __name__ == "__main__":
    main()
