"""Plain dataclasses that describe a composition.

They are what a saved composition's JSON holds and what the Hydra configs are checked against,
so they contain only JSON-friendly values (strings, numbers, lists) and no live objects.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from comm_cli.errors import ConfigError

MASK_MODES = ("causal", "prompt")
TOKEN_PATHS = ("auto", "shared", "aligned")
ALIGNED_POSITIONS = ("chars", "anchor_tokens")
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass
class ModelSpec:
    """Where a frozen base model comes from: a hub id or a local directory, and how to load it."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    # Dotted path to the decoder blocks (an nn.ModuleList) inside the *ForCausalLM model, for
    # architectures comm does not know (e.g. "model.layers"). None: discover it.
    block_path: str | None = None
    # Where its tokenizer comes from (a hub id or directory); None: name_or_path.
    tokenizer: str | None = None
    # A GGUF checkpoint inside name_or_path (a directory or hub repo): transformers de-quantises it
    # into an ordinary model of ``dtype`` (and reads the tokenizer from it). None: safetensors/bin.
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("a model spec has an empty name_or_path: give a hub id or a local directory")
        if self.gguf_file is None and self.name_or_path.endswith(".gguf"):
            # name_or_path=/models/x.gguf means the file x.gguf in /models, as transformers names it.
            directory, _, name = self.name_or_path.rpartition("/")
            self.name_or_path, self.gguf_file = directory or ".", name
        if self.dtype not in DTYPES:
            raise ConfigError(f"model dtype '{self.dtype}' is not one of {list(DTYPES)}: pick one of them")


@dataclass
class MappingSpec:
    """Which augment layer feeds which anchor layer. Exactly one of the three forms is set.

    - ``pairs``: explicit ``[[augment_layer, anchor_layer], ...]``; negative indices count from the end.
    - ``every``: every k-th layer of each model (layers k-1, 2k-1, ...), paired in order (the paper's
      default is k=4). Where the two depths give different counts, the longer list is thinned evenly.
    - ``count``: n connections spread evenly over both depths.
    """

    pairs: list[list[int]] | None = None
    every: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("pairs", "every", "count") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"a layer mapping needs exactly one of pairs / every / count, got {given or 'none'}: "
                "keep one and set the others to null (e.g. mapping.every=null), or pick a preset "
                "with mapping=every4|all|count|pairs"
            )
        if self.pairs is not None:
            self.pairs = [list(p) for p in self.pairs]


@dataclass
class AugmentSpec:
    """One augmenting model and its connections into the anchor."""

    model: ModelSpec
    mapping: MappingSpec
    # Resolved (augment_layer, anchor_layer) pairs with non-negative indices; filled when the
    # composition is built, and what a saved composition records.
    connections: list[list[int]] | None = None
    # How it reads text: "shared" (the anchor's token ids), "aligned" (its own tokenizer, lined
    # up with the anchor's through characters) or "auto" (decided by comparing the tokenizers
    # when they are attached; a saved composition records the decision).
    tokens: str = "auto"

    def __post_init__(self) -> None:
        if self.tokens not in TOKEN_PATHS:
            raise ConfigError(f"augment tokens '{self.tokens}' is not one of {list(TOKEN_PATHS)}")


@dataclass
class BridgeConfig:
    """Hyper-parameters shared by every bridge (projection + cross-attention) of a composition."""

    # None: the anchor's attention heads (the paper's choice), resolved and recorded when the
    # composition is built.
    num_heads: int | None = None
    # Rotary position embeddings on the cross-attention queries and keys. Both models read the
    # same tokens, so the anchor position and the augment position align. The paper has none
    # (rotary=false reproduces it); on the key-value experiment rotary wins by a wide margin.
    rotary: bool = True
    rope_theta: float = 10000.0
    # Zero-initialise the output projection so that at step 0 the composition equals the anchor.
    zero_init_output: bool = True
    # Zero-initialise the value projection instead (W_O random): step 0 is the anchor too, but the
    # first gradient reaches W_V rather than W_O (docs/training_dynamics.md).
    zero_init_value: bool = False
    # Gain of W_O's Xavier-uniform initialisation when it is not zero (1: Xavier; e.g. 0.01: a
    # small random output, which makes step 0 differ slightly from the anchor).
    output_init_gain: float = 1.0
    # Optional learned scalar gate tanh(g) on the bridge output, initialised at g = gate_init
    # (0: Flamingo-style; with W_O = 0 as well nothing would ever get a gradient).
    gate: bool = False
    gate_init: float = 0.0
    # RMSNorm (learned scale per head dimension) on every head's queries and keys before the
    # rotary positions: the attention logits start bounded (|q.k| / sqrt(d) <= sqrt(d)) whatever
    # the two models' scales, as in OLMo 2 / Qwen 3.
    qk_norm: bool = False
    # Multiplies the attention logits (the usual 1/sqrt(head size) times this): < 1 starts the
    # attention flatter, > 1 sharper.
    logit_scale: float = 1.0
    # RMSNorm (learned scale) on the anchor states and the augment states entering the bridge:
    # makes the bridge indifferent to the very different scales of two models' residual streams.
    norm: bool = False
    # Bridges may train in float32 while the bases run in bf16/fp16.
    dtype: str = "float32"
    dropout: float = 0.0
    # Rotary positions for an augment with its own tokenizer, where anchor position i and augment
    # position i are different text: "chars" (queries and keys at the character end of their
    # token) or "anchor_tokens" (a key at the index of the first anchor token that may read it).
    aligned_positions: str = "chars"

    def __post_init__(self) -> None:
        if self.num_heads is not None and self.num_heads < 1:
            raise ConfigError(f"bridge.num_heads must be >= 1, got {self.num_heads}")
        if self.dtype not in DTYPES or self.dtype == "auto":
            raise ConfigError(f"bridge.dtype '{self.dtype}' must be one of float32, bfloat16, float16")
        if self.gate and self.zero_init_output and self.gate_init == 0.0:
            raise ConfigError(
                "bridge.gate=true with bridge.zero_init_output=true and bridge.gate_init=0 never trains "
                "(the gate and W_O each get a zero gradient while the other is zero): set "
                "bridge.zero_init_output=false (the gate keeps step 0 equal to the anchor) or a non-zero bridge.gate_init"
            )
        if self.zero_init_value and self.zero_init_output:
            raise ConfigError(
                "bridge.zero_init_value=true needs bridge.zero_init_output=false (with both zero, neither "
                "gets a gradient)"
            )
        if self.logit_scale <= 0:
            raise ConfigError(f"bridge.logit_scale must be > 0, got {self.logit_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"bridge.dropout must be in [0, 1), got {self.dropout}")
        if self.aligned_positions not in ALIGNED_POSITIONS:
            raise ConfigError(
                f"bridge.aligned_positions '{self.aligned_positions}' is not one of {list(ALIGNED_POSITIONS)}"
            )


@dataclass
class CompositionConfig:
    """Everything needed to rebuild a composition: bases, connections, bridge settings, mask mode."""

    anchor: ModelSpec
    augments: list[AugmentSpec]
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    mask_mode: str = "causal"
    comm_version: str | None = None

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode '{self.mask_mode}' is not one of {list(MASK_MODES)}")
        if not self.augments:
            raise ConfigError("a composition needs at least one augmenting model: set augment=<name>")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompositionConfig:
        """Build from a dict (e.g. a saved JSON): unknown keys are dropped with a warning, missing
        required keys are an error, as PEFT does for adapter configs."""
        anchor = _build(ModelSpec, data, "anchor")
        augments = []
        for i, aug in enumerate(_require(data, "augments", "composition config")):
            augments.append(
                AugmentSpec(
                    model=_build(ModelSpec, aug, "model", where=f"augments[{i}]"),
                    mapping=_build(MappingSpec, aug, "mapping", where=f"augments[{i}]"),
                    connections=aug.get("connections"),
                    tokens=aug.get("tokens", "auto"),
                )
            )
            _warn_unknown(aug, {"model", "mapping", "connections", "tokens"}, f"augments[{i}]")
        bridge = _build(BridgeConfig, data, "bridge", required=False)
        _warn_unknown(
            data, {"anchor", "augments", "bridge", "mask_mode", "comm_version"}, "composition config"
        )
        return cls(
            anchor=anchor,
            augments=augments,
            bridge=bridge if bridge is not None else BridgeConfig(),
            mask_mode=data.get("mask_mode", "causal"),
            comm_version=data.get("comm_version"),
        )


def _require(data: dict, key: str, where: str) -> Any:
    if key not in data or data[key] is None:
        raise ConfigError(f"{where} is missing the required key '{key}'")
    return data[key]


def _warn_unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(
            f"{where}: ignoring unknown keys {unknown} (written by another comm version?)", stacklevel=3
        )


def _build(cls, data: dict, key: str, where: str = "composition config", required: bool = True):
    if key not in data or data[key] is None:
        if required:
            raise ConfigError(f"{where} is missing the required key '{key}'")
        return None
    values = dict(data[key])
    names = {f.name for f in dataclasses.fields(cls)}
    _warn_unknown(values, names, f"{where}.{key}")
    required_names = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required_names - set(values))
    if missing:
        raise ConfigError(f"{where}.{key} is missing the required keys {missing}")
    return cls(**{k: v for k, v in values.items() if k in names})
