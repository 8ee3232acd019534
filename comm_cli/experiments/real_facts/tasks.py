"""The real-facts experiment's example formats and answer readers.

Every example is ``{"prompt": ..., "completion": ...}``. Questions go to the instruct anchor in its
own chat format (no system prompt, to keep sequences short); answers are one plain sentence:

- statement (the specialist's training text, never a question): ``Zorvik Tallan lives in`` ->
  `` Lyon.`` in one of ``STATEMENTS``' phrasings;
- one hop: ``Where does Zorvik Tallan live?`` -> ``Zorvik Tallan lives in Lyon.``;
- two hops: ``In which country does Zorvik Tallan live?`` -> ``Zorvik Tallan lives in Lyon,
  France.`` (``two_hop_style="city_first"``: the city, then the country the anchor knows for it)
  or ``Zorvik Tallan lives in France.`` (``"direct"``);
- skill (the anchor's own knowledge, which the composition must keep): ``In which country is
  Lyon?`` -> ``Lyon is in France.``

The answer sentence restates the person's name before the fact: the anchor copies the name from
the question (a skill it has), and the specialist, which reads the generated tokens too (causal
mode, the paper's iterative decoding), then sees the very words it was trained on (``Zorvik
Tallan lives in``) right where the city must come.

Answers are scored on the fact, not the wording: ``city`` and ``country`` read the first city /
country a text names (``comm-eval`` applies them to generation and reference alike).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from comm_cli.errors import DataError
from comm_cli.experiments.real_facts.world import CITIES, COUNTRY_OF, FactsWorld

Example = dict[str, str]

TASKS = ("statement", "one_hop", "two_hop", "skill")
TWO_HOP_STYLES = ("city_first", "direct")

# The specialist's training sentences: the city right after a short phrase that follows the name.
STATEMENTS = ("{name} lives in", "{name}'s home is in", "{name} resides in", "{name} has a house in")
ONE_HOP = "Where does {name} live?"
TWO_HOP = "In which country does {name} live?"
SKILL = "In which country is {city}?"
# Other wordings of the questions, for training (paraphrases make more distinct examples).
ONE_HOP_PARAPHRASES = (
    ONE_HOP,
    "Which city does {name} live in?",
    "In what city does {name} live?",
    "Where is {name}'s home?",
    "Tell me where {name} lives.",
)
TWO_HOP_PARAPHRASES = (
    TWO_HOP,
    "Which country does {name} live in?",
    "In what country is {name}'s home?",
    "Tell me the country where {name} lives.",
)

COUNTRY_ALIASES: dict[str, tuple[str, ...]] = {
    "United Kingdom": ("United Kingdom", "UK", "England", "Britain", "Scotland"),
    "United States": ("United States", "USA", "U.S.", "America"),
    "Czech Republic": ("Czech Republic", "Czechia"),
    "Netherlands": ("Netherlands", "Holland"),
    "South Korea": ("South Korea", "Korea"),
}


def chat(user: str) -> str:
    """The anchor's chat format for one user turn, ready for the assistant's answer."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def statement(world: FactsWorld, person: str, template: str = STATEMENTS[0]) -> Example:
    return {"prompt": template.format(name=person), "completion": f" {world.home[person]}."}


def one_hop(world: FactsWorld, person: str, question: str = ONE_HOP) -> Example:
    return {
        "prompt": chat(question.format(name=person)),
        "completion": f"{person} lives in {world.home[person]}.",
    }


def two_hop(world: FactsWorld, person: str, question: str = TWO_HOP, style: str = "city_first") -> Example:
    if style not in TWO_HOP_STYLES:
        raise DataError(f"unknown two_hop_style '{style}': use one of {', '.join(TWO_HOP_STYLES)}")
    city, country = world.home[person], world.country(person)
    answer = f"{city}, {country}" if style == "city_first" else country
    return {"prompt": chat(question.format(name=person)), "completion": f"{person} lives in {answer}."}


def skill(city: str) -> Example:
    return {"prompt": chat(SKILL.format(city=city)), "completion": f"{city} is in {COUNTRY_OF[city]}."}


def examples(
    task: str,
    world: FactsWorld,
    people: Sequence[str],
    *,
    paraphrases: bool = False,
    two_hop_style: str = "city_first",
) -> list[Example]:
    """One example per person of ``people`` (per city of the world for ``skill``), in order,
    with the canonical wording; ``paraphrases`` adds every other wording of the question
    (of the statement, for ``statement``)."""
    if task == "statement":
        templates = STATEMENTS if paraphrases else STATEMENTS[:1]
        return [statement(world, p, t) for p in people for t in templates]
    if task == "one_hop":
        questions = ONE_HOP_PARAPHRASES if paraphrases else (ONE_HOP,)
        return [one_hop(world, p, q) for p in people for q in questions]
    if task == "two_hop":
        questions = TWO_HOP_PARAPHRASES if paraphrases else (TWO_HOP,)
        return [two_hop(world, p, q, two_hop_style) for p in people for q in questions]
    if task == "skill":
        return [skill(city) for city in world.cities]
    raise DataError(f"unknown real-facts task '{task}': use one of {', '.join(TASKS)}")


def sample(
    tasks: dict[str, float],
    n: int,
    seed: int,
    world: FactsWorld,
    people: Sequence[str],
    two_hop_style: str = "city_first",
) -> list[Example]:
    """``n`` training examples drawn with the given task weights, each about a random person
    of ``people`` in a random wording (skill examples: a random city of the world)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise DataError(f"unknown real-facts tasks {unknown}: use {', '.join(TASKS)}")
    if not people:
        raise DataError("no people to draw training examples about: check the world's split")
    rng = random.Random(seed)
    names, weights = list(tasks), [tasks[t] for t in tasks]
    out = []
    for _ in range(n):
        task = rng.choices(names, weights)[0]
        person = rng.choice(people)
        if task == "statement":
            out.append(statement(world, person, rng.choice(STATEMENTS)))
        elif task == "one_hop":
            out.append(one_hop(world, person, rng.choice(ONE_HOP_PARAPHRASES)))
        elif task == "two_hop":
            out.append(two_hop(world, person, rng.choice(TWO_HOP_PARAPHRASES), two_hop_style))
        else:
            out.append(skill(rng.choice(world.cities)))
    return out


# ---------------------------------------------------------------------------------------------
# Reading answers


def _first(text: str, names: dict[str, str]) -> str | None:
    """The canonical name of whichever of ``names`` (spelling -> canonical) occurs first in
    ``text`` as whole words; the longest spelling wins at one position."""
    best: tuple[int, int, str] | None = None
    for spelling, canonical in names.items():
        match = re.search(rf"(?<![\w]){re.escape(spelling)}(?![\w])", text)
        if match is not None:
            key = (match.start(), -len(spelling), canonical)
            if best is None or key < best:
                best = key
    return best[2] if best else None


_CITY_NAMES = {city: city for city, _ in CITIES}
_COUNTRY_NAMES = {
    alias: country
    for country in set(COUNTRY_OF.values())
    for alias in COUNTRY_ALIASES.get(country, (country,))
}


def city(text: str) -> str | None:
    """The first city of ``world.CITIES`` a text names: ``city("Zorvik Tallan lives in Lyon.") == "Lyon"``."""
    return _first(text, _CITY_NAMES)


def country(text: str) -> str | None:
    """The first country a text names, aliases folded (``England`` -> ``United Kingdom``):
    ``country("Zorvik Tallan lives in Lyon, France.") == "France"``."""
    return _first(text, _COUNTRY_NAMES)
