"""comm-chat's conversation: turns kept as chat messages (posed through the anchor's chat template)
or, for a tokenizer without one, joined as plain text; replies streamed; a few slash commands.

``Chat`` knows nothing of terminals: it reads lines from a function, writes reply text and notes
through two others, so a terminal, a pipe and a test drive it the same way (``comm_cli.chat``).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable

from comm_cli.inference.session import Sampling, Session

HELP = """commands:
  /reset          forget the conversation
  /bridges off|on the composition without or with its bridges (what the augment adds)
  /help           this list
  /exit           leave (or Ctrl-D); Ctrl-C stops a reply"""


class Conversation:
    """The turns so far and the text the next reply follows."""

    def __init__(self, session: Session):
        self.session = session
        self.turns: list[tuple[str, str]] = []  # (user, reply)

    def prompt(self, user: str) -> str:
        if self.session.chat:
            messages = []
            for said, replied in self.turns:
                messages += [{"role": "user", "content": said}, {"role": "assistant", "content": replied}]
            return self.session.prompt_text(messages=[*messages, {"role": "user", "content": user}])
        # No chat template: each turn is the text the model read and what it wrote after it.
        return "".join(f"{said}{replied}\n" for said, replied in self.turns) + user

    def fit(self, user: str) -> tuple[str, int]:
        """The prompt for ``user`` with the oldest turns dropped until it fits the anchor's
        context; (prompt, number of turns dropped)."""
        dropped = 0
        text = self.prompt(user)
        while self.turns and len(self.session.prompt_ids(text)) >= self.session.max_length:
            self.turns.pop(0)
            dropped += 1
            text = self.prompt(user)
        return text, dropped


class Chat:
    """One terminal chat: ``run(read_line)`` until the input ends or the user leaves."""

    def __init__(
        self,
        session: Session,
        sampling: Sampling,
        write: Callable[[str], None],
        note: Callable[[str], None],
    ):
        self.session, self.sampling, self.write, self.note = session, sampling, write, note
        self.conversation = Conversation(session)
        self.replies = 0
        self._stop = False

    @property
    def composed(self) -> bool:
        from comm_cli.compose import ComposedModel

        return isinstance(self.session.model, ComposedModel)

    def start(self) -> None:
        if not self.session.chat:
            self.note(
                "the anchor's tokenizer has no chat template (or chat_template=false): chatting with plain "
                "prompts, the conversation so far joined as text"
            )

    def run(self, read_line: Callable[[], str | None]) -> None:
        """Read and answer lines until ``read_line`` returns None (end of input) or /exit."""
        self.start()
        while True:
            line = read_line()
            if line is None or not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """Answer one line (a message or a command); False when the user leaves."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.reply(line.rstrip("\r\n"))
        return True

    def command(self, text: str) -> bool:
        name, *args = text.split()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/reset":
            self.conversation.turns.clear()
            self.note("conversation cleared")
        elif name == "/bridges":
            self.bridges(args)
        else:
            self.note(f"unknown command {name}: /help lists the commands")
        return True

    def bridges(self, args: list[str]) -> None:
        if not self.composed:
            self.note(f"/bridges needs a composition (model=calm); this is model={self.session.loaded.kind}")
            return
        if args not in (["on"], ["off"]):
            self.note("/bridges on or /bridges off")
            return
        self.session.model.set_bridges_enabled(args[0] == "on")
        what = "on: the composition" if args[0] == "on" else "off: the anchor alone"
        self.note(f"bridges {what}")

    def reply(self, user: str) -> None:
        """Stream a reply to ``user`` and keep the turn; Ctrl-C stops the reply (what came so
        far is kept) and the chat goes on."""
        prompt, dropped = self.conversation.fit(user)
        if dropped:
            self.note(f"the conversation outgrew the anchor's context: dropped the oldest {dropped} turn(s)")
        sampling = self.sampling  # sampled replies: the n-th draws from seed + n
        if sampling.do_sample and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + self.replies)
        self.replies += 1
        self._stop = False
        main = threading.current_thread() is threading.main_thread()  # where signals are handled
        previous = signal.signal(signal.SIGINT, self._interrupt) if main else None
        try:
            completion = self.session.complete(
                [prompt], sampling, on_text=lambda row, delta: self.write(delta), cancelled=self._cancelled
            )[0]
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.write("\n")
        if self._stop:
            self.note("[stopped]")
        self.conversation.turns.append((user, completion.text))

    def _interrupt(self, signum, frame) -> None:
        self._stop = True

    def _cancelled(self, row: int) -> bool:
        return self._stop
