"""The key-value experiment's world: random string keys, their single-digit values, and the split
into composition keys (the composition trains on them) and held-out keys (it is evaluated on
them; only the augmenting model knows their values)."""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from comm_cli.errors import DataError

SPLITS = ("composition", "heldout", "all")


@dataclass
class KVWorld:
    """A seeded key -> value mapping and its split into composition and held-out keys.

    ``composition_keys`` and ``heldout_keys`` partition ``keys``; the composition is trained
    on the first and evaluated on the second, so the split must never share a key.
    """

    seed: int
    values: dict[str, int]
    composition_keys: list[str]
    heldout_keys: list[str]
    key_length: int = 3
    num_values: int = 10

    @classmethod
    def create(
        cls,
        seed: int = 0,
        num_keys: int = 500,
        key_length: int = 3,
        num_values: int = 10,
        composition_fraction: float = 0.2,
        balanced: bool = True,
    ) -> KVWorld:
        """Draw ``num_keys`` distinct random lowercase keys with values in ``[0, num_values)``
        and put ``round(composition_fraction * num_keys)`` of them in the composition split.

        ``balanced``: the composition keys hold every value equally often (as nearly as the
        counts allow). A plain random split of 100 keys can leave a value with 4 keys; the
        bridges then see that value too rarely to learn to carry it, and the held-out keys with it
        fail (docs/experiments/key_value.md, "What decided it"). False: a plain random split (the recipe before
        RECIPE_VERSION 2's ``balanced_split``)."""
        if num_keys > 26**key_length:
            raise DataError(
                f"cannot draw {num_keys} distinct keys of length {key_length}: use longer keys or fewer keys"
            )
        num_composition = round(composition_fraction * num_keys)
        if not 0 < num_composition < num_keys:
            raise DataError(
                f"composition_fraction={composition_fraction} leaves no composition or no held-out keys "
                f"among {num_keys}: choose a fraction strictly between 0 and 1"
            )
        rng = random.Random(seed)
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < num_keys:
            key = "".join(rng.choices(string.ascii_lowercase, k=key_length))
            if key not in seen:
                seen.add(key)
                keys.append(key)
        values = {key: rng.randrange(num_values) for key in keys}
        order = keys[:]
        rng.shuffle(order)
        if balanced:
            order = _balanced_order(order, values, num_values)
        return cls(
            seed=seed,
            values=values,
            composition_keys=sorted(order[:num_composition]),
            heldout_keys=sorted(order[num_composition:]),
            key_length=key_length,
            num_values=num_values,
        )

    @property
    def keys(self) -> list[str]:
        return list(self.values)

    def split_keys(self, split: str) -> list[str]:
        """The keys of a split: "composition", "heldout" or "all"."""
        if split == "composition":
            return self.composition_keys
        if split == "heldout":
            return self.heldout_keys
        if split == "all":
            return self.keys
        raise DataError(f"unknown key split '{split}': use one of {', '.join(SPLITS)}")

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "key_length": self.key_length,
            "num_values": self.num_values,
            "values": self.values,
            "composition_keys": self.composition_keys,
            "heldout_keys": self.heldout_keys,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> KVWorld:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"key-value world file '{path}' does not exist: build the specialists first")
        data = json.loads(path.read_text())
        return cls(
            seed=data["seed"],
            values={k: int(v) for k, v in data["values"].items()},
            composition_keys=list(data["composition_keys"]),
            heldout_keys=list(data["heldout_keys"]),
            key_length=data.get("key_length", 3),
            num_values=data.get("num_values", 10),
        )


def _balanced_order(order: list[str], values: dict[str, int], num_values: int) -> list[str]:
    """``order`` rearranged so that any prefix of it holds every value as evenly as possible:
    round-robin over the values, each value's keys in their shuffled order."""
    by_value: dict[int, list[str]] = {v: [] for v in range(num_values)}
    for key in order:
        by_value[values[key]].append(key)
    out: list[str] = []
    while len(out) < len(order):
        for value in range(num_values):
            if by_value[value]:
                out.append(by_value[value].pop(0))
    return out
