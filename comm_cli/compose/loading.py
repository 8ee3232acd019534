"""Loading frozen base models and their configs from a hub id, a local directory or a GGUF file.

A spec with ``gguf_file`` names a GGUF checkpoint inside ``name_or_path``; transformers reads its
config from the file's metadata and de-quantises its tensors into an ordinary model of the spec's
dtype, so everything downstream (blocks, bridges, saving) is the same as for safetensors.

Errors that a user causes (a path that does not exist, an id the hub does not know, a
``trust_remote_code`` model without the flag, a GGUF file that is missing or holds an
architecture transformers cannot read) become one-line ModelLoadErrors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from comm_cli.compose.specs import ModelSpec
from comm_cli.errors import ModelLoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype | str:
    """Map a config dtype name to a torch dtype ("auto" passes through to transformers)."""
    return "auto" if name == "auto" else _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def canonical_name(name_or_path: str) -> str:
    """An existing local directory becomes absolute (so a saved composition loads from anywhere);
    anything else is kept as a hub id."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def spec_of(model) -> ModelSpec:
    """A ModelSpec that names an in-memory model by where it was loaded from (may be empty for a
    model built from a config; such a composition can be saved but needs its bases passed in to load)."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "<in-memory>"
    return ModelSpec(name_or_path=canonical_name(name), dtype=dtype_name(next(model.parameters()).dtype))


def _gguf_kwargs(spec: ModelSpec) -> dict:
    return {"gguf_file": spec.gguf_file} if spec.gguf_file else {}


def _gguf_model_kwargs(spec: ModelSpec) -> dict:
    """Ask for every weight de-quantised at load time: a plain dense model of the spec's dtype,
    never one that keeps GGUF blocks (which newer transformers does when a matmul kernel is
    installed, and which could then not train through, carry LoRA, or be saved)."""
    kwargs = _gguf_kwargs(spec)
    if kwargs:
        try:
            from transformers import GgufConfig
        except ImportError:  # older transformers always de-quantise
            return kwargs
        kwargs["quantization_config"] = GgufConfig(gguf_file=spec.gguf_file, dequantize=True)
    return kwargs


def _forget_gguf_origin(model) -> None:
    """A de-quantised model still carries transformers' GGUF quantizer, which refuses
    ``save_pretrained``; once the weights are dense it describes nothing, so drop it."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        quantizer.remove_quantization_config(model)


def check_gguf(spec: ModelSpec, what: str = "model") -> None:
    """What transformers reports badly about a GGUF spec, checked before it is asked: the
    ``gguf`` package, and a local file that is not there."""
    if not spec.gguf_file:
        return
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelLoadError(
            f"{what} '{spec.gguf_file}' is a GGUF file, and reading one needs the gguf package: "
            "pip install gguf (it comes with comm-cli; reinstall comm-cli if it is missing)"
        ) from err
    directory = Path(spec.name_or_path).expanduser()
    if directory.is_dir() or not _looks_like_hub_id(spec.name_or_path):
        path = directory / spec.gguf_file
        if not path.is_file():
            raise ModelLoadError(
                f"{what}: the GGUF file '{path}' does not exist: set name_or_path to the directory that "
                "holds the .gguf file and gguf_file to its name (or name_or_path to the file itself)"
            )


def _explain_gguf(spec: ModelSpec, what: str, err: Exception) -> ModelLoadError | None:
    """A one-line error for a GGUF file transformers cannot read, or None when it is not that."""
    message = str(err)
    if "GGUF model with architecture" in message:
        architecture = message.split("architecture", 1)[1].split("is not supported")[0].strip()
        try:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            # the mapping's "general" and "tokenizer" sections are not architectures
            readable = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))
        except ImportError:
            readable = "see transformers' GGUF documentation"
        return ModelLoadError(
            f"{what} '{spec.gguf_file}' holds a '{architecture}' model, which transformers cannot read from GGUF "
            f"(it reads {readable}): convert it to a safetensors directory or pick a model of a readable architecture"
        )
    if "GGUF magic" in message or "not a GGUF file" in message:
        return ModelLoadError(
            f"{what} '{spec.gguf_file}' in '{spec.name_or_path}' is not a GGUF file: point gguf_file at a .gguf "
            "checkpoint, or leave it unset for a safetensors directory"
        )
    return None


def _explain(spec: ModelSpec, what: str, err: Exception) -> ModelLoadError:
    if spec.gguf_file:
        explained = _explain_gguf(spec, what, err)
        if explained is not None:
            return explained
    name = spec.name_or_path
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name)
    if "trust_remote_code" in str(err):
        return ModelLoadError(
            f"{what} '{name}' needs custom code from its repository: set trust_remote_code=true for it "
            "if you trust that code"
        )
    if looks_local and not Path(name).expanduser().exists():
        return ModelLoadError(f"{what} '{name}' does not exist: give an existing model directory or a hub id")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"cannot load {what} '{name}' ({first_line}): give a local directory holding config.json and "
        "weights, or a Hugging Face Hub id reachable from this machine (check spelling, revision and network)"
    )


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def load_model_config(spec: ModelSpec, what: str = "model"):
    """The transformers config of a base model, without loading its weights."""
    from transformers import AutoConfig

    check_gguf(spec, what)
    try:
        return AutoConfig.from_pretrained(
            spec.name_or_path,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **_gguf_kwargs(spec),
        )
    except (OSError, ValueError, KeyError) as err:
        raise _explain(spec, what, err) from err


def load_causal_lm(spec: ModelSpec, what: str = "model", device: str | torch.device | None = None):
    """Load a *ForCausalLM model in eval mode with the spec's dtype (a GGUF file is de-quantised
    to it; ``dtype=auto`` keeps transformers' choice)."""
    from transformers import AutoModelForCausalLM

    check_gguf(spec, what)
    model = _from_pretrained(AutoModelForCausalLM, spec, what, device, **_gguf_model_kwargs(spec))
    _forget_gguf_origin(model)
    return model


def _from_pretrained(cls, spec: ModelSpec, what: str, device, **kwargs):
    """``cls.from_pretrained`` with the spec's revision, dtype and remote-code choice, its load
    errors explained in one line, on ``device`` and in eval mode."""
    try:
        model = cls.from_pretrained(
            spec.name_or_path,
            revision=spec.revision,
            dtype=torch_dtype(spec.dtype),
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as err:
        raise _explain(spec, what, err) from err
    if device is not None:
        model.to(device)
    return model.eval()


def load_augment_model(
    spec: ModelSpec, what: str = "augmenting model", device: str | torch.device | None = None
):
    """An augmenting model: a causal LM, or a bidirectional encoder's base (BERT-like through
    AutoModel without its pooler, T5/mT5 through their encoder-only classes)."""
    from comm_cli.compose.blocks import is_encoder

    config = load_model_config(spec, what)
    if not is_encoder(config):
        return load_causal_lm(spec, what, device)
    import transformers

    encoder_classes = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    cls = getattr(transformers, encoder_classes.get(config.model_type, "AutoModel"))
    kwargs = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta", "xlm-roberta") else {}
    return _from_pretrained(cls, spec, what, device, **kwargs)


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declares_generic_tokenizer(name_or_path: str) -> bool:
    """A local directory whose tokenizer_config.json declares the generic `tokenizers` backend.

    transformers' AutoTokenizer swaps in the model type's own tokenizer class for some types
    (qwen2, phi3, ...) even when the directory declares a generic one, which silently re-tokenises
    a custom tokenizer (e.g. the key-value experiment's character tokenizer saved beside a Qwen2
    model). The declared class is what the directory means."""
    path = Path(name_or_path) / "tokenizer_config.json"
    if not path.is_file() or not (Path(name_or_path) / "tokenizer.json").is_file():
        return False
    try:
        return json.loads(path.read_text()).get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES
    except (OSError, ValueError):
        return False


# What a saved tokenizer writes (any one of them makes a directory a tokenizer's).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def load_tokenizer(name_or_path: str, spec: ModelSpec | None = None, what: str = "tokenizer"):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # A GGUF spec reads its tokenizer from the same file as its weights (unless the spec names
    # another tokenizer source).
    gguf = _gguf_kwargs(spec) if spec is not None and name_or_path == spec.name_or_path else {}
    local = Path(name_or_path).expanduser()
    if not gguf and local.is_dir() and not any((local / name).exists() for name in TOKENIZER_FILES):
        # transformers 5 builds an empty tokenizer of the model's class from a directory with no
        # tokenizer files; such a tokenizer would be taken for a real, different one
        raise ModelLoadError(
            f"the {what}: '{name_or_path}' holds no tokenizer files: set tokenizer=<directory or hub id> "
            "to one that has them"
        )
    try:
        if not gguf and _declares_generic_tokenizer(name_or_path):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                name_or_path,
                revision=spec.revision if spec else None,
                trust_remote_code=spec.trust_remote_code if spec else False,
                **gguf,
            )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load the {what} from '{name_or_path}' ({str(err).splitlines()[0]}): "
            "set tokenizer=<directory or hub id> to one that has tokenizer files"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
