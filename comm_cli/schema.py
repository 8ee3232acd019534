"""The structured-config schema behind ``conf/train.yaml`` and ``conf/eval.yaml``.

Hydra merges every YAML file and command-line override onto these dataclasses, so an unknown
key or a value of the wrong type is rejected with the key's full name before any model loads.
The composition's own pieces (ModelSpec, MappingSpec, BridgeConfig) and the data config are the
same dataclasses the library uses, so the schema cannot drift from the code. Each built-in
experiment's own sections (``kv``, ``data.kv``, ``facts``, ``data.facts``) come from its package under ``comm_cli.experiments``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from comm_cli.compose.specs import BridgeConfig, MappingSpec, ModelSpec
from comm_cli.data.loading import DataConfig
from comm_cli.experiments.kv_arithmetic.config import KVSpecialistsConfig, KVTaskConfig
from comm_cli.experiments.kv_arithmetic.specialists import SpecialistSettings
from comm_cli.experiments.real_facts.config import FactsConfig, FactsTaskConfig
from comm_cli.experiments.real_facts.specialists import FactsSettings

METHODS = ("calm", "lora", "full")


@dataclass
class AugmentEntry:
    """An additional augmenting model (``extra_augments``) with its own connections."""

    model: ModelSpec = MISSING
    mapping: MappingSpec = MISSING


@dataclass
class DataSchema(DataConfig):
    # When set, the data are generated in memory by this experiment's generator (comm_cli.data.build)
    # instead of read with `datasets.load_dataset`.
    synthetic: str | None = None
    kv: KVTaskConfig = field(default_factory=KVTaskConfig)
    facts: FactsTaskConfig = field(default_factory=FactsTaskConfig)


@dataclass
class LoraConfig:
    # None: the rank whose trainable-parameter count is closest to the CALM bridges' count.
    r: int | None = None
    alpha: float | None = None  # None: 2 * r
    dropout: float = 0.0
    # None: PEFT's default for the architecture (often q_proj, v_proj); [all-linear]: every linear layer
    target_modules: list[str] | None = None


@dataclass
class MethodConfig:
    name: str = "calm"  # calm | lora (PEFT LoRA on the anchor) | full (fine-tune the anchor)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd | adafactor
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # cosine: decay to lr * min_lr_ratio


@dataclass
class TrainerConfig:
    max_steps: int | None = None  # optimizer steps; takes precedence over epochs
    epochs: float | None = None
    batch_size: int = 8  # per process, per micro-batch
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | no | bf16 | fp16
    log_every: int = 10
    eval_every: int | None = None  # None: only at the end
    eval_batches: int | None = None  # None: the whole validation split
    save_every: int | None = None  # None: only the final save
    keep_last: int = 2
    num_workers: int = 0
    gradient_checkpointing: bool = False
    compile_bridges: bool = False
    cache_augment_states: bool = False
    cache_dir: str | None = None  # augment-state cache; None: <run dir>/augment_cache
    num_threads: int | None = None  # CPU threads for torch (None: torch's default)
    progress_bar: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | tensorboard | none
    project: str = "comm"
    entity: str | None = None
    run_name: str | None = None
    # auto: online when W&B credentials are found, else offline (never a login prompt)
    mode: str = "auto"  # auto | online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    name: str = "kv_arithmetic"  # the run's name: its directory is <output_root>/<name>
    output_root: str = "outputs"
    output_dir: str | None = None  # None: Hydra's run directory (hydra.run.dir / the sweep job's)
    resume: str | None = None  # null | auto | PATH to a checkpoint directory
    overwrite: bool = False  # replace a run directory that holds another run
    seed: int = 0
    anchor: ModelSpec = MISSING
    augment: ModelSpec = MISSING
    mapping: MappingSpec = MISSING
    extra_augments: list[AugmentEntry] = field(default_factory=list)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    mask_mode: str = "causal"
    tokenizer: str | None = None  # None: the anchor's
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataSchema = field(default_factory=DataSchema)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kv: KVSpecialistsConfig = field(default_factory=KVSpecialistsConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    num_samples: int = 1  # with do_sample: n samples per prompt, exact match = any correct
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int = 64


@dataclass
class EvalTask:
    """One evaluation: a dataset (its ``data.split``) and the metrics to compute on it."""

    data: DataSchema = field(default_factory=DataSchema)
    # loss (+ perplexity, teacher-forced) | exact_match (generation) | chrf (chrF++) | bleu
    metrics: list[str] = field(default_factory=lambda: ["loss"])
    # how an answer is read from a generation and its reference:
    # full | first_number | last_number | regex | package.module:function (an experiment's own reader)
    extract: str = "full"
    regex: str | None = None  # extract=regex: the first group (or the whole match)
    max_examples: int | None = None
    max_new_tokens: int | None = None  # None: generation.max_new_tokens


@dataclass
class EvalConfig:
    name: str = "eval_${model}"
    output_root: str = "outputs"
    output_dir: str | None = None  # None: Hydra's run directory (hydra.run.dir / the sweep job's)
    seed: int = 0
    # what to evaluate: calm (a saved composition at `checkpoint`), anchor, augment, lora (a PEFT
    # adapter at `checkpoint`), full (a fine-tuned model directory at `checkpoint`)
    model: str = "calm"
    checkpoint: str | None = None
    anchor: ModelSpec = MISSING
    augment: ModelSpec = MISSING
    tokenizer: str | None = None
    tasks: dict[str, EvalTask] = field(default_factory=dict)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # with model=calm: also evaluate with the bridges switched off (the anchor's skills kept)
    bridges_off: bool = False
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    kv: KVSpecialistsConfig = field(default_factory=KVSpecialistsConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    sample_predictions: int = 20  # rows of the predictions table sent to the tracker
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # override the bases' dtype (e.g. bfloat16 on a GPU)
    num_threads: int | None = None


def _kv_settings_hash(node) -> str:
    """``${comm_kv_hash:${kv.specialists}}``: the specialists' settings hash, so that specialists
    built with other settings live in another directory (a saved composition that names
    ``<kv.dir>/anchor`` keeps pointing at the weights it was trained with)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    return SpecialistSettings.from_dict(data).hash()


def _facts_settings_hash(node) -> str:
    """``${comm_facts_hash:${facts.settings}}``: the real-facts bases of other settings live in
    another directory."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
    return FactsSettings.from_dict(data).hash()


def register_schemas() -> None:
    """Make the schemas available to Hydra's defaults lists (``- train_schema``) and register
    comm's resolvers."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("comm_kv_hash"):
        OmegaConf.register_new_resolver("comm_kv_hash", _kv_settings_hash)
    if not OmegaConf.has_resolver("comm_facts_hash"):
        OmegaConf.register_new_resolver("comm_facts_hash", _facts_settings_hash)

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="eval_schema", node=EvalConfig)
