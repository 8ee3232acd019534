"""`comm-generate`: text from a saved composition or a baseline (``comm-generate --help``).

Prompts come from ``prompt=``, ``prompts_file=`` or stdin (``comm_cli.inference.prompts``); the
results, one jsonl line a prompt, go to ``output=FILE`` (written whole or not at all) or stdout.
A single prompt on a terminal is streamed instead: its reply's text as it comes.
"""

from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.evaluation.from_run import with_the_runs_bos
from comm_cli.schema import GenerateConfig, check_generate_values

PROGRAM = "comm-generate"
EXIT_INTERRUPTED = 130  # the shells' 128 + SIGINT

register_configs()


def run(cfg: DictConfig) -> int:
    """Generate for every prompt; the number of results written."""
    import dataclasses
    from pathlib import Path

    from comm_cli.atomic import atomic_write
    from comm_cli.inference.batch import generate_records, settings_of
    from comm_cli.inference.prompts import read_prompts
    from comm_cli.inference.session import Sampling, load_session, log_to_stderr

    typed = typed_config(cfg, check_generate_values)
    log_to_stderr(typed.verbose)
    records = read_prompts(typed.prompt, typed.prompts_file, sys.stdin)
    session = load_session(typed)
    seed = typed.seed if typed.generation.do_sample else None
    sampling = dataclasses.replace(Sampling.from_config(typed.generation), seed=seed)
    streaming = typed.stream if typed.stream is not None else (len(records) == 1 and sys.stdout.isatty())
    settings = settings_of(typed, session, sampling)
    results = generate_records(
        session, records, sampling, typed.batch_size, settings, stream=_write_stdout if streaming else None
    )
    path = None if typed.output is None else Path(typed.output).expanduser()
    try:
        if path is None:  # jsonl on stdout, or only the streamed text
            return _write_jsonl(results, None if streaming else sys.stdout, streaming)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = []
        atomic_write(path, lambda tmp: written.append(_write_jsonl(results, tmp, streaming)))
        print(f"{PROGRAM}: wrote {written[0]} results to {path}", file=sys.stderr, flush=True)
        return written[0]
    except KeyboardInterrupt:
        unwritten = f"; {path} not written" if path is not None else ""
        print(f"\n{PROGRAM}: interrupted{unwritten}", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _write_jsonl(results, out, streaming: bool) -> int:
    """Write each result as it comes (``out``: a stream, a path, or None for none); after a
    streamed reply, the newline that ends it. The number of results."""
    import json
    from pathlib import Path

    handle = open(out, "w", encoding="utf-8") if isinstance(out, Path) else out
    count = 0
    try:
        for row in results:
            if streaming:
                _write_stdout("\n")
            if handle is not None:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
            count += 1
    finally:
        if isinstance(out, Path):
            handle.close()
    return count


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


main = command(
    PROGRAM, "generate", run, lambda: GenerateConfig, argv_hook=with_the_runs_bos, run_directory=False
)

if __name__ == "__main__":
    main()
