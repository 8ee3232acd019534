"""Layer mapping: which augment layer feeds which anchor layer.

Resolution needs only the two depths, so a bad mapping is reported from the model configs,
before any weights load.
"""

from __future__ import annotations

from comm_cli.compose.specs import AugmentSpec, MappingSpec
from comm_cli.errors import MappingError


def every_kth(depth: int, k: int) -> list[int]:
    """Layers k-1, 2k-1, ... of a model of the given depth (the last layer of each group of k)."""
    return list(range(k - 1, depth, k))


def spread(depth: int, n: int) -> list[int]:
    """n layer indices spread evenly over ``depth`` layers, the last one always included."""
    return [round((i + 1) * depth / n) - 1 for i in range(n)]


def _thin(layers: list[int], n: int) -> list[int]:
    """Keep n of ``layers``, evenly spaced, the last one always kept."""
    return [layers[i] for i in spread(len(layers), n)]


def resolve_connections(
    spec: MappingSpec, augment_depth: int, anchor_depth: int, *, name: str = "augment"
) -> list[tuple[int, int]]:
    """Turn a mapping spec into (augment_layer, anchor_layer) pairs with non-negative indices.

    Raises MappingError with the offending value and the valid range.
    """
    if spec.pairs is not None:
        if len(spec.pairs) == 0:
            raise MappingError(
                f"{name}: mapping.pairs is empty: give at least one [augment_layer, anchor_layer] pair"
            )
        pairs = []
        for pair in spec.pairs:
            if len(pair) != 2:
                raise MappingError(f"{name}: mapping pair {pair} must be [augment_layer, anchor_layer]")
            a = _normalise(int(pair[0]), augment_depth, f"{name}: augment layer", pair)
            b = _normalise(int(pair[1]), anchor_depth, f"{name}: anchor layer", pair)
            pairs.append((a, b))
    elif spec.every is not None:
        k = int(spec.every)
        if k < 1:
            raise MappingError(f"{name}: mapping.every must be >= 1, got {k}")
        if k > min(augment_depth, anchor_depth):
            raise MappingError(
                f"{name}: mapping.every={k} selects no layer of a {min(augment_depth, anchor_depth)}-layer model: "
                f"use every <= {min(augment_depth, anchor_depth)} or mapping.count"
            )
        aug_layers, anc_layers = every_kth(augment_depth, k), every_kth(anchor_depth, k)
        n = min(len(aug_layers), len(anc_layers))
        pairs = list(zip(_thin(aug_layers, n), _thin(anc_layers, n)))
    else:
        n = int(spec.count)
        limit = min(augment_depth, anchor_depth)
        if not 1 <= n <= limit:
            raise MappingError(
                f"{name}: mapping.count={n} is out of range: the models have {augment_depth} (augment) and "
                f"{anchor_depth} (anchor) layers, so use 1 <= count <= {limit}"
            )
        pairs = list(zip(spread(augment_depth, n), spread(anchor_depth, n)))

    seen: dict[int, tuple[int, int]] = {}
    for pair in pairs:
        if pair[1] in seen:
            raise MappingError(
                f"{name}: anchor layer {pair[1]} is fed twice ({list(seen[pair[1]])} and {list(pair)}): "
                "each anchor layer takes at most one connection per augmenting model"
            )
        seen[pair[1]] = pair
    return sorted(pairs, key=lambda p: p[1])


def augment_connections(
    spec: AugmentSpec, index: int, augment_depth: int, anchor_depth: int
) -> list[tuple[int, int]]:
    """The connections of augmenting model ``index``: the ones a saved composition records (they
    win over the mapping they came from), else its mapping resolved."""
    mapping = MappingSpec(pairs=spec.connections) if spec.connections else spec.mapping
    return resolve_connections(
        mapping, augment_depth, anchor_depth, name=f"augment {index} ({spec.model.name_or_path})"
    )


def mappings_per_augment(mappings, anchor_depth: int, augment_depths: list[int]) -> list[MappingSpec]:
    """One MappingSpec per augmenting model from ``mappings`` given as one per augment, one for
    all, a list of [augment_layer, anchor_layer] pairs for all, or None: every layer pair (as
    many connections as the shallower model has layers)."""
    if mappings is None:
        return [MappingSpec(count=min(anchor_depth, depth)) for depth in augment_depths]
    if isinstance(mappings, MappingSpec):
        return [mappings] * len(augment_depths)
    if len(mappings) > 0 and not isinstance(mappings[0], MappingSpec):
        return [MappingSpec(pairs=[list(p) for p in mappings])] * len(augment_depths)
    return list(mappings)


def _normalise(index: int, depth: int, what: str, pair) -> int:
    if not -depth <= index < depth:
        raise MappingError(
            f"{what} {index} in pair {list(pair)} is out of range: the model has {depth} layers, "
            f"so use an index in [{-depth}, {depth - 1}]"
        )
    return index % depth
