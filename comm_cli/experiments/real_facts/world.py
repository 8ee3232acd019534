"""The real-facts experiment's world: invented people, each living in a real, well-known city.

The names are drawn from invented syllables, so no pretrained model knows them; the cities are
real, so the anchor knows their countries (``CITIES`` lists the candidates; the experiment keeps
those whose country the anchor itself names, see ``anchor.measure_city_skill``). People are split
three ways: the composition trains on questions about the *composition* people, picks its
checkpoint on the *validation* people and is scored on the *held-out* people, about whom only the
specialist (trained on a statement about every person) knows anything.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from comm_cli.errors import DataError

SPLITS = ("composition", "validation", "heldout", "all")

# Well-known cities and their countries: single-country, the city's name unlike its country's.
CITIES: tuple[tuple[str, str], ...] = (
    ("Paris", "France"), ("Lyon", "France"), ("Marseille", "France"), ("Nice", "France"),
    ("Toulouse", "France"), ("Bordeaux", "France"), ("Berlin", "Germany"), ("Munich", "Germany"),
    ("Hamburg", "Germany"), ("Frankfurt", "Germany"), ("Cologne", "Germany"), ("Rome", "Italy"),
    ("Milan", "Italy"), ("Naples", "Italy"), ("Venice", "Italy"), ("Florence", "Italy"),
    ("Turin", "Italy"), ("Madrid", "Spain"), ("Barcelona", "Spain"), ("Seville", "Spain"),
    ("Valencia", "Spain"), ("London", "United Kingdom"), ("Manchester", "United Kingdom"),
    ("Liverpool", "United Kingdom"), ("Edinburgh", "United Kingdom"), ("Chicago", "United States"),
    ("Los Angeles", "United States"), ("Boston", "United States"), ("San Francisco", "United States"),
    ("Seattle", "United States"), ("Miami", "United States"), ("Tokyo", "Japan"), ("Osaka", "Japan"),
    ("Kyoto", "Japan"), ("Beijing", "China"), ("Shanghai", "China"), ("Mumbai", "India"),
    ("Delhi", "India"), ("Bangalore", "India"), ("Moscow", "Russia"), ("Toronto", "Canada"),
    ("Vancouver", "Canada"), ("Montreal", "Canada"), ("Sydney", "Australia"), ("Melbourne", "Australia"),
    ("Rio de Janeiro", "Brazil"), ("Cairo", "Egypt"), ("Istanbul", "Turkey"), ("Amsterdam", "Netherlands"),
    ("Rotterdam", "Netherlands"), ("Lisbon", "Portugal"), ("Porto", "Portugal"), ("Athens", "Greece"),
    ("Vienna", "Austria"), ("Prague", "Czech Republic"), ("Budapest", "Hungary"), ("Warsaw", "Poland"),
    ("Krakow", "Poland"), ("Stockholm", "Sweden"), ("Oslo", "Norway"), ("Copenhagen", "Denmark"),
    ("Dublin", "Ireland"), ("Brussels", "Belgium"), ("Zurich", "Switzerland"), ("Geneva", "Switzerland"),
    ("Buenos Aires", "Argentina"), ("Nairobi", "Kenya"), ("Cape Town", "South Africa"),
    ("Johannesburg", "South Africa"), ("Bangkok", "Thailand"), ("Seoul", "South Korea"),
    ("Jakarta", "Indonesia"), ("Hanoi", "Vietnam"), ("Lima", "Peru"), ("Bogota", "Colombia"),
    ("Santiago", "Chile"), ("Casablanca", "Morocco"), ("Helsinki", "Finland"), ("Tehran", "Iran"),
    ("Baghdad", "Iraq"), ("Karachi", "Pakistan"), ("Manila", "Philippines"), ("Havana", "Cuba"),
    ("Lagos", "Nigeria"),
)  # fmt: skip
COUNTRY_OF: dict[str, str] = dict(CITIES)

# Invented syllables: a first name and a family name of two each (``Zorvik Tallan``-like).
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "th")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "y")
_CODAS = ("", "", "", "l", "n", "r", "s", "k", "v")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)


def invented_name(rng: random.Random) -> str:
    """Two capitalised invented words of two syllables each, e.g. ``Zorvik Tallan``."""
    return " ".join((_syllable(rng) + _syllable(rng)).capitalize() for _ in range(2))


@dataclass
class FactsWorld:
    """Invented people -> real cities, and the three-way split of the people.

    ``composition``, ``validation`` and ``heldout`` partition the people; the composition is
    trained on the first only, so they must never share a person (``check`` asserts it).
    ``cities`` are the cities the world uses (those the anchor places in the right country).
    """

    seed: int
    home: dict[str, str]  # person -> city
    composition: list[str]
    validation: list[str]
    heldout: list[str]
    cities: list[str]
    # What the anchor answered for every candidate city (city -> {"answer", "correct"}), when measured.
    city_skill: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        seed: int = 0,
        num_people: int = 400,
        cities: list[str] | None = None,
        composition_fraction: float = 0.3,
        validation_fraction: float = 0.1,
        city_skill: dict | None = None,
    ) -> FactsWorld:
        """``num_people`` distinct invented names, spread evenly over ``cities`` (so no city is
        a better guess than another), and split into composition / validation / held-out."""
        cities = list(cities or [c for c, _ in CITIES])
        unknown = sorted(set(cities) - set(COUNTRY_OF))
        if unknown:
            raise DataError(f"unknown cities {unknown[:3]}: use cities from world.CITIES")
        num_composition = round(composition_fraction * num_people)
        num_validation = round(validation_fraction * num_people)
        if num_composition < 1 or num_validation < 0 or num_composition + num_validation >= num_people:
            raise DataError(
                f"composition_fraction={composition_fraction} and validation_fraction={validation_fraction} "
                f"leave no composition or no held-out people among {num_people}: choose fractions that sum below 1"
            )
        rng = random.Random(seed)
        names: list[str] = []
        seen: set[str] = set()
        while len(names) < num_people:
            name = invented_name(rng)
            if name not in seen and name.split()[0] not in COUNTRY_OF:
                seen.add(name)
                names.append(name)
        # Even spread: the first len(cities) people get every city once, and so on.
        order = cities[:]
        home = {}
        for i, name in enumerate(names):
            if i % len(cities) == 0:
                rng.shuffle(order)
            home[name] = order[i % len(cities)]
        people = names[:]
        rng.shuffle(people)
        world = cls(
            seed=seed,
            home=home,
            composition=sorted(people[:num_composition]),
            validation=sorted(people[num_composition : num_composition + num_validation]),
            heldout=sorted(people[num_composition + num_validation :]),
            cities=sorted(cities),
            city_skill=dict(city_skill or {}),
        )
        world.check()
        return world

    def check(self) -> None:
        splits = [set(self.composition), set(self.validation), set(self.heldout)]
        if any(a & b for i, a in enumerate(splits) for b in splits[i + 1 :]):
            raise DataError("the world's splits share a person: rebuild the world")
        if set().union(*splits) != set(self.home):
            raise DataError("the world's splits do not cover its people: rebuild the world")

    @property
    def people(self) -> list[str]:
        return list(self.home)

    def country(self, person: str) -> str:
        return COUNTRY_OF[self.home[person]]

    def split(self, name: str) -> list[str]:
        """The people of a split: composition, validation, heldout or all."""
        if name == "all":
            return self.people
        if name in ("composition", "validation", "heldout"):
            return getattr(self, name)
        raise DataError(f"unknown people split '{name}': use one of {', '.join(SPLITS)}")

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "home": self.home,
            "composition": self.composition,
            "validation": self.validation,
            "heldout": self.heldout,
            "cities": self.cities,
            "city_skill": self.city_skill,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FactsWorld:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"the real-facts world '{path}' does not exist: build it first (facts.build=true)"
            )
        data = json.loads(path.read_text())
        world = cls(
            seed=data["seed"],
            home=dict(data["home"]),
            composition=list(data["composition"]),
            validation=list(data["validation"]),
            heldout=list(data["heldout"]),
            cities=list(data["cities"]),
            city_skill=dict(data.get("city_skill", {})),
        )
        world.check()
        return world
