"""`comm-chat`: a conversation in the terminal with a saved composition or a baseline
(``comm-chat --help``; the conversation itself is ``comm_cli.inference.chat``).

On a terminal: a ``> `` prompt with line editing, replies streamed, notes on stderr. Lines piped on
stdin are the user's turns, one a line, and stdout gets the replies, one a turn.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.evaluation.from_run import with_the_runs_bos
from comm_cli.schema import ChatConfig, check_use_values

PROGRAM = "comm-chat"

register_configs()


def run(cfg: DictConfig) -> None:
    import dataclasses

    from comm_cli.inference.chat import Chat
    from comm_cli.inference.session import Sampling, load_session, log_to_stderr

    typed = typed_config(cfg, check_use_values)
    log_to_stderr(typed.verbose)
    session = load_session(typed)
    sampling = dataclasses.replace(Sampling.from_config(typed.generation), seed=typed.seed)
    chat = Chat(session, sampling, _write, _note)
    if sys.stdin.isatty():
        what = (
            typed.checkpoint
            if typed.model == "calm"
            else f"model={typed.model} {session.loaded.tokenizer_source}"
        )
        bridges = " (bridges off)" if typed.bridges_off else ""
        _note(f"{PROGRAM}: {what}{bridges}. /help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves.")
        chat.run(_terminal_reader())
    else:
        chat.run(_pipe_reader(sys.stdin))


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _terminal_reader():
    """``input`` with a prompt and line editing; Ctrl-C at the prompt starts a fresh line,
    Ctrl-D (end of input) leaves."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass

    def read() -> str | None:
        while True:
            try:
                return input("> ")
            except EOFError:
                _write("\n")
                return None
            except KeyboardInterrupt:
                _write("\n")

    return read


def _pipe_reader(stream):
    def read() -> str | None:
        line = stream.readline()
        return None if line == "" else line.rstrip("\n")

    return read


main = command(PROGRAM, "chat", run, lambda: ChatConfig, argv_hook=with_the_runs_bos, run_directory=False)

if __name__ == "__main__":
    main()
