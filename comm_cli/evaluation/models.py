"""What comm-eval scores: a saved composition or one of the paper's baselines, behind one
interface (teacher-forced logits and batched greedy/sampled generation)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from comm_cli.compose import ComposedModel
from comm_cli.compose.loading import load_causal_lm
from comm_cli.compose.saving import read_composition_config
from comm_cli.compose.specs import ModelSpec
from comm_cli.errors import ConfigError, ModelLoadError
from comm_cli.training.models import batch_logits

logger = logging.getLogger(__name__)

MODELS = ("calm", "anchor", "augment", "lora", "full")


@dataclass
class EvalModel:
    """A model under evaluation and the tokenizer source that goes with it."""

    kind: str
    model: nn.Module
    tokenizer_source: str
    checkpoint: str | None
    # The base model's spec when the tokenizer comes from it (a GGUF file carries its own tokenizer).
    tokenizer_spec: ModelSpec | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch_logits(self.model, batch, composed=isinstance(self.model, ComposedModel))

    @property
    def read_plan(self):
        """How a composition's models read text (None for a plain model or a shared tokenizer)."""
        return self.model.read_plan() if isinstance(self.model, ComposedModel) else None

    def generate(
        self,
        input_ids,
        attention_mask,
        generation,
        max_new_tokens,
        eos_token_id,
        pad_token_id,
        generator,
        stopping=None,
        prompts=None,
        streamer=None,
    ):
        """New tokens (batch, <= max_new_tokens) after left-padded prompts. ``stopping`` (a
        ``StopStrings``, or any callable (sequences, prompt_length) -> done rows) ends a row early;
        ``prompts`` are the prompt texts, which a composition with an augment of its own tokenizer
        reads; ``streamer`` gets the tokens as they come (transformers' protocol)."""
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=generation.do_sample,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if generation.do_sample:
            kwargs.update(temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p)
        if isinstance(self.model, ComposedModel):
            out = self.model.generate(
                input_ids,
                attention_mask,
                generator=generator,
                stopping=stopping,
                prompts=prompts,
                streamer=streamer,
                **kwargs,
            )
        else:
            if generation.do_sample:
                # the generator may live on the GPU: draw the seed there
                where = generator.device if generator is not None else None
                seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=where)
                torch.manual_seed(int(seed))
            if stopping is not None:
                from transformers import StoppingCriteriaList

                from comm_cli.evaluation.stopping import as_transformers_criteria

                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    [as_transformers_criteria(stopping, input_ids.shape[1])]
                )
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                streamer=streamer,
                **{k: v for k, v in kwargs.items() if v is not None},
            )
        return out[:, input_ids.shape[1] :]


def _spec_with(spec: ModelSpec, dtype: str | None) -> ModelSpec:
    if dtype is None:
        return spec
    return dataclasses.replace(spec, dtype=dtype)


def choose_device(name: str | None) -> torch.device:
    """``device=`` of comm-eval and the use commands, checked before anything loads: None is cuda
    when this machine has a GPU, else cpu; a mistyped device, or a GPU this machine lacks, is one
    line (not torch's traceback from deep inside the first ``.to``)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"device={name} is not a device: give cpu, cuda, cuda:N or mps (or leave it unset: cuda when there is one)"
        ) from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={name} but torch sees no CUDA GPU on this machine: give device=cpu, or leave device unset"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={name} but this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device={name} but MPS is not available here: give device=cpu, or leave device unset"
        )
    return device


def _same_place(given: str, recorded: str) -> bool:
    if given == recorded:
        return True
    a, b = Path(given).expanduser(), Path(recorded).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def bases_moved(cfg, composition) -> tuple[str | None, list[str | None]]:
    """The bases a command names for a composition (``anchor.name_or_path``,
    ``augment.name_or_path`` for its first augment) where they differ from the recorded ones:
    the models have moved, or another copy is to be used."""
    anchor = getattr(cfg.anchor, "name_or_path", None)
    augment = getattr(getattr(cfg, "augment", None), "name_or_path", None)
    anchor_at = anchor if anchor and not _same_place(anchor, composition.anchor.name_or_path) else None
    first = composition.augments[0].model.name_or_path
    augment_at = augment if augment and not _same_place(augment, first) else None
    return anchor_at, [augment_at]


def check_model_choice(cfg) -> None:
    """What the config says about the model, checked before anything loads (comm-eval and the use
    commands): a composition's checkpoint and the base models it names, a baseline's base model,
    a LoRA or fine-tuned run's directory. Each problem is one line naming the fix."""
    from comm_cli.compose.saving import CONFIG_NAME, WEIGHTS_NAME, check_bases_fit, with_bases_at

    if cfg.model == "calm":
        if not cfg.checkpoint:
            raise ConfigError("model=calm needs checkpoint=<directory of a saved composition>")
        if not Path(cfg.checkpoint).expanduser().exists():
            raise ModelLoadError(
                f"checkpoint '{cfg.checkpoint}' does not exist: give the directory comm-train saved "
                "(outputs/NAME/composition) or one written by save_pretrained"
            )
        composition = read_composition_config(cfg.checkpoint)  # one line when missing or damaged
        if not (Path(cfg.checkpoint) / WEIGHTS_NAME).is_file():
            raise ModelLoadError(
                f"'{cfg.checkpoint}' has no {WEIGHTS_NAME}: the composition was not saved completely"
            )
        anchor_at, augments_at = bases_moved(cfg, composition)
        moved = anchor_at or any(augments_at)
        composition = with_bases_at(composition, anchor_at, augments_at) if moved else composition
        bases = [("anchor", "anchor", composition.anchor)]
        bases += [(f"augmenting model {i}", "augment", a.model) for i, a in enumerate(composition.augments)]
        for what, key, spec in bases:
            name = spec.name_or_path
            local = Path(name).expanduser().is_absolute() or name.startswith((".", "~"))
            if local and not Path(name).expanduser().exists():
                raise ModelLoadError(
                    f"the {what} '{name}' of the composition in '{cfg.checkpoint}' is not there: give "
                    f"{key}.name_or_path=<where it is now> (or set it in {Path(cfg.checkpoint) / CONFIG_NAME})"
                )
        if moved:  # bases named on the command line must fit the saved bridges
            check_bases_fit(cfg.checkpoint, composition)
    if cfg.model in ("anchor", "augment", "lora"):
        which = "augment" if cfg.model == "augment" else "anchor"
        if getattr(cfg, which).name_or_path is None:
            raise ConfigError(
                f"model={cfg.model} needs the {which}: give {which}.name_or_path=<hub id or directory> "
                f"(or a preset, {which}=NAME)"
            )
    if cfg.model in ("lora", "full") and (not cfg.checkpoint or not Path(cfg.checkpoint).is_dir()):
        raise ModelLoadError(
            f"model={cfg.model} needs checkpoint=<directory written by comm-train method={cfg.model}>, "
            f"got {cfg.checkpoint}"
        )


def load_eval_model(cfg, device: torch.device) -> EvalModel:
    kind = cfg.model
    if kind not in MODELS:
        raise ConfigError(f"model '{kind}' is not one of {list(MODELS)}")
    if kind == "calm":
        if not cfg.checkpoint:
            raise ConfigError("model=calm needs checkpoint=<directory of a saved composition>")
        anchor_at, augments_at = bases_moved(cfg, read_composition_config(cfg.checkpoint))
        model = ComposedModel.from_pretrained(
            cfg.checkpoint, device=device, dtype=cfg.dtype, anchor_at=anchor_at, augments_at=augments_at
        )
        anchor = model.config.anchor
        return EvalModel(kind, model.eval(), anchor.name_or_path, str(cfg.checkpoint), anchor)
    if kind in ("anchor", "augment"):
        spec = _spec_with(cfg.anchor if kind == "anchor" else cfg.augment, cfg.dtype)
        model = load_causal_lm(spec, f"{kind} model", device)
        return EvalModel(kind, model, spec.name_or_path, None, spec)
    if not cfg.checkpoint or not Path(cfg.checkpoint).is_dir():
        raise ModelLoadError(
            f"model={kind} needs checkpoint=<directory written by comm-train method={kind}>, got {cfg.checkpoint}"
        )
    if kind == "lora":
        from peft import PeftModel

        base = load_causal_lm(_spec_with(cfg.anchor, cfg.dtype), "anchor model", device)
        try:
            model = PeftModel.from_pretrained(base, cfg.checkpoint).merge_and_unload()
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"cannot load the LoRA adapter in {cfg.checkpoint} ({err}): give an adapter/ directory"
            ) from err
        return EvalModel(kind, model.eval(), cfg.anchor.name_or_path, str(cfg.checkpoint), cfg.anchor)
    spec = ModelSpec(str(cfg.checkpoint), dtype=cfg.dtype or "float32")
    return EvalModel(
        kind, load_causal_lm(spec, "fine-tuned model", device), str(cfg.checkpoint), str(cfg.checkpoint)
    )
