"""The structured-config schema behind ``conf/train.yaml`` and ``conf/eval.yaml``.

Hydra merges every YAML file and command-line override onto these dataclasses, so an unknown
key or a value of the wrong type is rejected with the key's full name before any model loads.
The composition's own pieces (ModelSpec, MappingSpec, BridgeConfig) and the data config are the
same dataclasses the library uses, so the schema cannot drift from the code. The sections of the
experiments (a top-level one and one under ``data``, e.g. ``kv`` and ``data.kv``) come from the
experiment registry (``comm_cli.registry``): ``build_schemas`` adds each registered experiment's
sections to the classes below, null unless a config sets them. This module names no experiment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from comm_cli import registry
from comm_cli.compose.specs import BridgeConfig, MappingSpec, ModelSpec
from comm_cli.data.loading import DataConfig
from comm_cli.errors import ConfigError

METHODS = ("calm", "lora", "full")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class AugmentEntry:
    """An additional augmenting model (``extra_augments``) with its own connections."""

    model: ModelSpec = MISSING
    mapping: MappingSpec = MISSING
    tokens: str = "auto"  # auto | shared | aligned: how it reads text (augment_tokens for the first)


@dataclass
class DataSchema(DataConfig):
    # When set, the data are generated in memory by this experiment's generator (comm_cli.data.build)
    # instead of read with `datasets.load_dataset`.
    synthetic: str | None = None


@dataclass
class LoraConfig:
    # None: the rank whose trainable-parameter count is closest to the CALM bridges' count.
    r: int | None = None
    alpha: float | None = None  # None: 2 * r
    dropout: float = 0.0
    # None: PEFT's default for the architecture (often q_proj, v_proj); [all-linear]: every linear layer
    target_modules: list[str] | None = None
    # None: every decoder layer; else the indices of the layers LoRA adapts (PEFT's
    # layers_to_transform), e.g. the top layers, where a composition's bridges write.
    layers: list[int] | None = None


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
    eval_every: int | None = None  # None: after every epoch and at the end
    eval_batches: int | None = None  # None: the whole validation split
    save_every: int | None = None  # None: only the final save
    keep_last: int = 2
    num_workers: int = 0
    gradient_checkpointing: bool = False
    compile_bridges: bool = False
    cache_augment_states: bool = False
    cache_dir: str | None = None  # augment-state cache; None: <run dir>/augment_cache
    # The anchor's frozen bottom layers computed once over the training split (a step then starts
    # above them); share the directory between runs over one anchor and one training split.
    cache_anchor_prefix: bool = False
    anchor_prefix_layers: int | None = None  # None: every layer below the lowest trained one
    anchor_prefix_cache_dir: str | None = None  # None: <run dir>/anchor_prefix_cache
    # Set everything up (data, models, the caches above) and stop before the first step: builds
    # a shared cache once, e.g. before a sweep whose runs then read it.
    prepare_only: bool = False
    num_threads: int | None = None  # CPU threads for torch (None: torch's default)
    progress_bar: bool = True
    # Every log_every steps, per bridge, on that step's own batch (to the tracker, metrics.jsonl and
    # the console): the output/state norm ratio, the attention entropy and the gate.
    bridge_readings: bool = True
    # One console line when the run sits on a plateau (docs/training_dynamics.md#what-to-try):
    # past plateau_after of the steps, every bridge's output is still below plateau_output_ratio
    # of the anchor state, or the validation loss is not plateau_min_gain (a fraction) below the
    # anchor's own (bridges off, measured before the first step when there is validation data).
    plateau_check: bool = True
    plateau_after: float = 0.5
    plateau_output_ratio: float = 0.01
    plateau_min_gain: float = 0.01


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
    # Which settings this run started from: "custom" (comm's general defaults for a pair of your
    # own) or the experiment preset chosen with experiment=NAME (it sets this key).
    experiment: str = "custom"
    name: str = "run"  # the run's name: its directory is <output_root>/<name>
    output_root: str = "outputs"
    output_dir: str | None = None  # None: Hydra's run directory (hydra.run.dir / the sweep job's)
    resume: str | None = None  # null | auto | PATH to a checkpoint directory
    overwrite: bool = False  # replace a run directory that holds another run
    seed: int = 0
    verbose: bool = False  # library progress bars and INFO logs on the console too
    anchor: ModelSpec = MISSING
    augment: ModelSpec = MISSING
    mapping: MappingSpec = MISSING
    extra_augments: list[AugmentEntry] = field(default_factory=list)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    mask_mode: str = "causal"
    tokenizer: str | None = None  # None: the anchor's
    # How the augment reads text: auto (the anchor's ids when the tokenizers read alike, else its
    # own tokens lined up through characters), shared (the anchor's ids; an error if they differ)
    # or aligned (its own tokens even when they read alike).
    augment_tokens: str = "auto"
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataSchema = field(default_factory=DataSchema)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class BaseModelChoice(ModelSpec):
    """comm-eval's anchor / augment: a model spec whose ``name_or_path`` may stay unset, since a
    saved composition names its own bases (set it to evaluate a base model alone, or to load a
    composition's base from another place)."""

    name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.name_or_path is not None:
            super().__post_init__()


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
class CodeTaskConfig:
    """A code benchmark (metrics=[pass_at_k]): completions run against the problem's tests, each in
    its own process (comm_cli/evaluation/execution.py), only with execute_untrusted_code=true."""

    benchmark: str | None = None  # humaneval | mbpp: how prompts, stop strings and tests are built
    k: list[int] = field(default_factory=lambda: [1, 10, 100])  # pass@k for every k <= samples per problem
    timeout: float = 10.0  # seconds per program (wall clock)
    memory_mb: int = 1024  # address-space limit per program
    workers: int | None = None  # programs run at once; None: one per CPU core
    stop: list[str] | None = None  # None: the benchmark's usual stop strings


@dataclass
class EvalTask:
    """One evaluation: a dataset (its ``data.split``) and the metrics to compute on it."""

    data: DataSchema = field(default_factory=DataSchema)
    # loss (+ perplexity, teacher-forced) | exact_match (generation) | chrf (chrF++) | bleu
    # | pass_at_k (generated code executed against the tests; needs code.benchmark)
    metrics: list[str] = field(default_factory=lambda: ["loss"])
    # how an answer is read from a generation and its reference:
    # full | first_number | last_number | regex | package.module:function (an experiment's own reader)
    extract: str = "full"
    regex: str | None = None  # extract=regex: the first group (or the whole match)
    max_examples: int | None = None
    max_new_tokens: int | None = None  # None: generation.max_new_tokens
    # Generate at most as many tokens as the longest reference has, plus a few (an answer longer
    # than every reference cannot match it): what your own prompt/completion file gets.
    fit_to_references: bool = False
    stop: list[str] = field(default_factory=list)  # generation ends at any of these strings
    # Pose each prompt as a user turn of the anchor's chat template (instruct models); a code task
    # then asks for the code in a ```python block and runs the code of the reply.
    chat_template: bool = False
    code: CodeTaskConfig = field(default_factory=CodeTaskConfig)


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the same model (needs pip install 'comm-cli[harness]')."""

    tasks: list[str] = field(default_factory=list)  # task or group names, or paths of task YAML files
    include_path: str | None = None  # a directory of your own task YAMLs (lm-eval's --include_path)
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (a fraction when < 1); None: all
    batch_size: int | None = None  # None: generation.batch_size
    max_length: int | None = None  # context length; None: the anchor's max_position_embeddings
    log_samples: bool = True  # per-example requests and answers into predictions.jsonl
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {max_gen_toks: 128}
    add_bos_token: bool = True  # prepend the tokenizer's bos token, as comm-train does
    bootstrap_iters: int = 100000  # lm-eval's bootstrap for the stderr of metrics without a closed form


@dataclass
class EvalConfig:
    name: str = "eval_${model}"
    output_root: str = "outputs"
    output_dir: str | None = None  # None: Hydra's run directory (hydra.run.dir / the sweep job's)
    seed: int = 0
    verbose: bool = False  # library progress bars and INFO logs on the console too
    # what to evaluate: calm (a saved composition at `checkpoint`), anchor, augment, lora (a PEFT
    # adapter at `checkpoint`), full (a fine-tuned model directory at `checkpoint`)
    model: str = "calm"
    checkpoint: str | None = None
    anchor: BaseModelChoice = field(default_factory=BaseModelChoice)
    augment: BaseModelChoice = field(default_factory=BaseModelChoice)
    tokenizer: str | None = None
    tasks: dict[str, EvalTask] = field(default_factory=dict)
    # Your own prompt/completion data, scored with loss and exact match (normalised text) as a task
    # named after the file: comm-eval checkpoint=DIR data.data_files=test.jsonl. With a run's
    # checkpoint its training data settings (fields, format, length) are the defaults.
    data: DataSchema = field(default_factory=DataSchema)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Code benchmarks run model-generated programs on this machine (each in its own process with
    # time and memory limits and no network); they run only when this is true.
    execute_untrusted_code: bool = False
    # with model=calm: also evaluate with the bridges switched off (the anchor's skills kept);
    # null: on when scoring your own data (data.data_files), off otherwise
    bridges_off: bool | None = None
    # with model=calm: a PNG per bridge of where each head looks in the augment
    # (attention_bridge<i>.png next to results.json, and in the tracker), on the first
    # attention_map_examples rows of the first task with data (needs matplotlib)
    attention_maps: bool = False
    attention_map_examples: int = 3
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    sample_predictions: int = 20  # rows of the predictions table sent to the tracker
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # override the bases' dtype (e.g. bfloat16 on a GPU)
    num_threads: int | None = None


@dataclass
class SamplingConfig:
    """How text is generated by comm-generate, comm-chat and comm-serve (a request to comm-serve
    sets its own)."""

    max_new_tokens: int = 256
    do_sample: bool = False  # greedy unless true
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)  # a reply ends before any of these strings


@dataclass
class UseConfig:
    """What comm-generate, comm-chat and comm-serve load and how they pose prompts: a saved
    composition (model=calm checkpoint=DIR) or a baseline (model=anchor|augment|lora|full)."""

    model: str = "calm"
    checkpoint: str | None = None
    anchor: BaseModelChoice = field(default_factory=BaseModelChoice)
    augment: BaseModelChoice = field(default_factory=BaseModelChoice)
    tokenizer: str | None = None  # None: the anchor's (a composition's own)
    output_dir: str | None = None  # unused: these commands write no run directory
    bridges_off: bool = False  # a composition with its bridges switched off: the anchor alone
    # Pose prompts through the anchor's chat template: null = when its tokenizer has one
    chat_template: bool | None = None
    system: str | None = None  # a system turn before the user's (chat template only)
    # Prepend the tokenizer's bos token to a plain (non-chat) prompt; None: as the run trained
    # (its data.add_bos), else true. A chat template brings its own special tokens.
    add_bos: bool | None = None
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # override the bases' dtype (e.g. bfloat16 on a GPU)
    num_threads: int | None = None
    verbose: bool = False


@dataclass
class GenerateConfig(UseConfig):
    prompt: str | None = None  # one prompt; or prompts_file; or prompts from stdin
    prompts_file: str | None = None  # .txt (one prompt a line) or .jsonl (a "prompt" field)
    output: str | None = None  # jsonl of results (prompt, completion, settings); None: stdout
    # Print the reply token by token: null = for a single prompt on a terminal
    stream: bool | None = None
    batch_size: int = 16


@dataclass
class ChatConfig(UseConfig):
    pass


@dataclass
class ServeConfig(UseConfig):
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # the id /v1/models lists; None: the checkpoint's run name
    max_batch_size: int = 16  # requests that arrive together are batched up to this
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_queue: int = 64  # requests waiting past this get 503
    batching: bool = True  # false: one request at a time (for comparison)


# ------------------------------------------------------------------------------------ value checks
#
# The schema checks types; these check values, by key name, before anything is built or loaded:
# a budget of -5 steps or a batch of 0 examples would otherwise train nothing and exit 0, or end
# in a traceback from deep inside torch. Each rule: (dotted key, accepts(value), what it must be).

Rule = tuple[str, Callable[[object], bool], str]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low):
    return lambda v: _number(v) and v >= low


def _optional(check):
    return lambda v: v is None or check(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _fraction(v) -> bool:  # [0, 1)
    return _number(v) and 0 <= v < 1


def _one_of(*names):
    return lambda v: v in names


TRAIN_RULES: tuple[Rule, ...] = (
    (
        "trainer.max_steps",
        _optional(_at_least(1)),
        "a positive number of optimizer steps, or null to train by trainer.epochs",
    ),
    ("trainer.epochs", _optional(_positive), "a positive number of epochs, or null"),
    ("trainer.batch_size", _at_least(1), "a positive number of examples per process"),
    (
        "trainer.eval_batch_size",
        _optional(_at_least(1)),
        "a positive batch size, or null for trainer.batch_size",
    ),
    ("trainer.gradient_accumulation_steps", _at_least(1), "a positive number of micro-batches per step"),
    ("trainer.max_grad_norm", _optional(_positive), "a positive norm, or null for no clipping"),
    ("trainer.mixed_precision", _one_of("auto", "no", "bf16", "fp16"), "one of auto, no, bf16, fp16"),
    ("trainer.log_every", _at_least(1), "a positive number of steps"),
    (
        "trainer.eval_every",
        _optional(_at_least(1)),
        "a positive number of steps, or null for after every epoch",
    ),
    ("trainer.eval_batches", _optional(_at_least(1)), "a positive number of batches, or null for all"),
    (
        "trainer.save_every",
        _optional(_at_least(1)),
        "a positive number of steps, or null for after every epoch",
    ),
    ("trainer.keep_last", _at_least(0), "how many checkpoints to keep (0 keeps all)"),
    ("trainer.num_workers", _at_least(0), "0 or more data-loading processes"),
    ("trainer.num_threads", _optional(_at_least(1)), "a positive number of CPU threads, or null"),
    ("trainer.plateau_after", lambda v: _number(v) and 0 < v <= 1, "a share of the steps in (0, 1]"),
    ("trainer.plateau_output_ratio", _at_least(0), "0 or a positive norm ratio"),
    ("trainer.plateau_min_gain", _at_least(0), "0 or a positive fraction of the anchor's loss"),
    ("method.name", _one_of(*METHODS), f"one of {', '.join(METHODS)}"),
    ("optimizer.name", _one_of(*OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}"),
    ("scheduler.name", _one_of(*SCHEDULERS), f"one of {', '.join(SCHEDULERS)}"),
    ("method.lora.r", _optional(_at_least(1)), "a positive LoRA rank, or null to match the bridges' budget"),
    ("method.lora.dropout", _fraction, "a dropout probability in [0, 1)"),
    ("optimizer.lr", _positive, "a positive learning rate"),
    ("optimizer.weight_decay", _at_least(0), "0 or a positive weight decay"),
    ("optimizer.eps", _positive, "a small positive number"),
    ("optimizer.betas", lambda v: len(v) == 2 and all(_fraction(b) for b in v), "two values in [0, 1)"),
    ("optimizer.momentum", _at_least(0), "0 or a positive momentum"),
    ("scheduler.warmup_steps", _at_least(0), "0 or more steps"),
    ("scheduler.warmup_ratio", _fraction, "a fraction of the steps in [0, 1)"),
    ("scheduler.min_lr_ratio", lambda v: _number(v) and 0 <= v <= 1, "a ratio in [0, 1]"),
    ("mask_mode", _one_of("causal", "prompt"), "causal or prompt"),
    ("logger.name", _one_of("wandb", "tensorboard", "none"), "one of wandb, tensorboard, none"),
    (
        "logger.mode",
        _one_of("auto", "online", "offline", "disabled"),
        "one of auto, online, offline, disabled",
    ),
)

EVAL_RULES: tuple[Rule, ...] = (
    (
        "model",
        _one_of("calm", "anchor", "augment", "lora", "full"),
        "one of calm, anchor, augment, lora, full",
    ),
    ("generation.max_new_tokens", _at_least(1), "a positive number of tokens"),
    ("generation.num_samples", _at_least(1), "a positive number of samples per prompt"),
    ("generation.temperature", _positive, "a positive temperature"),
    ("generation.top_k", _optional(_at_least(1)), "a positive k, or null"),
    ("generation.top_p", _optional(lambda v: _number(v) and 0 < v <= 1), "a probability in (0, 1], or null"),
    ("generation.batch_size", _at_least(1), "a positive batch size"),
    ("sample_predictions", _at_least(0), "0 or more rows"),
    ("attention_map_examples", _at_least(1), "a positive number of examples to draw"),
    ("num_threads", _optional(_at_least(1)), "a positive number of CPU threads, or null"),
    ("logger.name", _one_of("wandb", "tensorboard", "none"), "one of wandb, tensorboard, none"),
    (
        "logger.mode",
        _one_of("auto", "online", "offline", "disabled"),
        "one of auto, online, offline, disabled",
    ),
)

USE_RULES: tuple[Rule, ...] = (
    (
        "model",
        _one_of("calm", "anchor", "augment", "lora", "full"),
        "one of calm, anchor, augment, lora, full",
    ),
    ("generation.max_new_tokens", _at_least(1), "a positive number of tokens"),
    ("generation.temperature", _positive, "a positive temperature"),
    ("generation.top_k", _optional(_at_least(1)), "a positive k, or null"),
    ("generation.top_p", _optional(lambda v: _number(v) and 0 < v <= 1), "a probability in (0, 1], or null"),
    ("num_threads", _optional(_at_least(1)), "a positive number of CPU threads, or null"),
)

EVAL_TASK_RULES: tuple[Rule, ...] = (
    ("max_examples", _optional(_at_least(1)), "a positive number of examples, or null for all"),
    (
        "max_new_tokens",
        _optional(_at_least(0)),
        "0 or more tokens (0: the prompt alone is scored, as a code task can), or null for generation.max_new_tokens",
    ),
)


def _lookup(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_values(cfg, rules: tuple[Rule, ...], prefix: str = "") -> None:
    """Raise a ConfigError naming the first key whose value breaks its rule."""
    for key, accepts, what in rules:
        value = _lookup(cfg, key)
        if not accepts(value):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{prefix}{key}={shown} is not valid: it must be {what}")


def check_train_values(cfg: TrainConfig) -> None:
    check_values(cfg, TRAIN_RULES)
    if cfg.trainer.max_steps is None and cfg.trainer.epochs is None:
        raise ConfigError("no training budget: set trainer.max_steps=N or trainer.epochs=E")


def check_use_values(cfg: UseConfig) -> None:
    check_values(cfg, USE_RULES)


def check_generate_values(cfg: GenerateConfig) -> None:
    check_values(cfg, USE_RULES + (("batch_size", _at_least(1), "a positive number of prompts per batch"),))


def check_eval_values(cfg: EvalConfig) -> None:
    check_values(cfg, EVAL_RULES)
    for name, task in cfg.tasks.items():
        check_values(task, EVAL_TASK_RULES, prefix=f"tasks.{name}.")


def build_schemas() -> tuple[type, type]:
    """The train and eval config classes with every registered experiment's sections added
    (``Optional``, null by default: a config that uses an experiment sets its section)."""
    from dataclasses import make_dataclass
    from typing import Optional

    experiments = registry.experiments()
    data_fields = [
        # typing.Optional, not `X | None`: OmegaConf reads the former at run time
        (e.data_section, Optional[e.data_schema], field(default=None))  # noqa: UP045
        for e in experiments
        if e.data_section
    ]
    data = make_dataclass("DataSchema", data_fields, bases=(DataSchema,))
    task = make_dataclass("EvalTask", [("data", data, field(default_factory=data))], bases=(EvalTask,))
    sections = [
        (e.section, Optional[e.section_schema], field(default=None))  # noqa: UP045
        for e in experiments
        if e.section
    ]
    train = make_dataclass(
        "TrainConfig", [("data", data, field(default_factory=data)), *sections], bases=(TrainConfig,)
    )
    evaluate = make_dataclass(
        "EvalConfig",
        [
            ("tasks", dict[str, task], field(default_factory=dict)),
            ("data", data, field(default_factory=data)),
            *sections,
        ],
        bases=(EvalConfig,),
    )
    return train, evaluate


_SCHEMAS: dict[str, type] = {}


def train_schema() -> type:
    """The train config class as last registered (``register_schemas``)."""
    return _SCHEMAS.get("train") or build_schemas()[0]


def eval_schema() -> type:
    return _SCHEMAS.get("eval") or build_schemas()[1]


def register_schemas() -> None:
    """Make the schemas (with the experiments registered so far) available to Hydra's defaults
    lists (``- train_schema``) and register the experiments' resolvers."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    for experiment in registry.experiments():
        for name, resolver in experiment.resolvers.items():
            if not OmegaConf.has_resolver(name):
                OmegaConf.register_new_resolver(name, resolver)
    train, evaluate = build_schemas()
    _SCHEMAS.update(train=train, eval=evaluate)
    store = ConfigStore.instance()
    store.store(name="train_schema", node=train)
    store.store(name="eval_schema", node=evaluate)
    for name, node in (("generate", GenerateConfig), ("chat", ChatConfig), ("serve", ServeConfig)):
        store.store(name=f"{name}_schema", node=node)
