"""The loss without full logits: same value and same gradients as the loss over every logit.

Today's reference path computes the anchor's logits at every position and a float32
cross-entropy over the labels != -100. The paths under test compute the head only at the loss
positions (in chunks, from hidden states) or ask the model for the logits of those positions
only. Across the architecture matrix, including heads with extras (Gemma 2 soft-capping, Cohere
and Granite logit scaling, a head with a bias, tied embeddings), loss and gradients must match.
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from comm_cli import linear_ce
from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec
from comm_cli.errors import ConfigError
from comm_cli.linear_ce import linear_cross_entropy, select_backend, torch_linear_cross_entropy
from comm_cli.losses import IGNORE_INDEX, hidden_states_loss, loss_mask, next_token_loss
from comm_cli.output_head import OutputHead, output_head
from comm_cli.training.models import batch_loss
from tests.conftest import FAMILIES, VOCAB, tiny_config, tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)
# Every family of the matrix, plus heads with a bias (phi), a logit scale (cohere, granite),
# strong soft-capping (gemma2 with cap 0.5, so tanh bends) and tied embeddings (llama).
MATRIX = [*FAMILIES, "phi", "cohere", "granite", "gemma2_softcap", "llama_tied"]


def matrix_model(name: str, seed: int = 0, width: int = 48):
    family = {"gemma2_softcap": "gemma2", "llama_tied": "llama"}.get(name, name)
    config = tiny_config(family, width=width, layers=4)
    if name == "gemma2_softcap":
        config.final_logit_softcapping = 0.5
    if name == "llama_tied":
        config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if name == "llama_tied":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Today's path: float32 cross-entropy over every logit, ignoring -100."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def prompt_completion_batch(batch=3, length=20, prompt_fraction=0.7, seed=0):
    """Right-padded rows whose first 70% of real tokens are prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, real in enumerate(range(length, length - 3 * batch, -3)):
        mask[row, real:] = 0
        ids[row, real:] = 0
        labels[row, real:] = IGNORE_INDEX
        labels[row, : int(real * prompt_fraction)] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "augment_attention_mask": None}


def composition(anchor_name: str, mask_mode: str = "causal"):
    anchor = matrix_model(anchor_name)
    augment = tiny_model("qwen2" if anchor_name != "qwen2" else "gpt2", seed=1, width=32, layers=4)
    composed = ComposedModel.from_models(
        anchor,
        augment,
        MappingSpec(pairs=[[0, 1], [2, 3]]),
        BridgeConfig(num_heads=4, zero_init_output=False),
        mask_mode=mask_mode,
    )
    return composed


def bridge_grads(composed):
    return [p.grad.clone() for p in composed.bridge_parameters()]


# ---------------------------------------------------------------------------- the chunked function


@pytest.mark.parametrize(
    "scale, softcap, bias", [(1.0, None, False), (0.25, None, False), (1.0, 0.5, False), (1.0, None, True)]
)
def test_chunked_linear_cross_entropy_equals_the_unfused_head(scale, softcap, bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(101, 16, generator=g, requires_grad=True)
    b = torch.randn(101, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, 101, (23,), generator=g)
    head = OutputHead(weight, b, scale, softcap)
    inputs = [hidden, weight] + ([b] if bias else [])

    expected = F.cross_entropy(head.logits(hidden).float(), targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, inputs)
    got = torch_linear_cross_entropy(hidden, head, targets, rows_per_chunk=5)  # 5 chunks, last short
    got_grads = torch.autograd.grad(got * 0.5, inputs)

    torch.testing.assert_close(got, expected, **TOL)
    for a, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, e, **TOL)


def test_no_position_with_loss_gives_zero_and_no_grad_mode_gives_the_loss():
    head = OutputHead(torch.randn(11, 4))
    hidden = torch.randn(0, 4, requires_grad=True)
    assert linear_cross_entropy(hidden, head, torch.zeros(0, dtype=torch.long)).item() == 0.0
    hidden, targets = torch.randn(6, 4), torch.randint(0, 11, (6,))
    with torch.no_grad():
        value = torch_linear_cross_entropy(hidden, head, targets, rows_per_chunk=4)
    torch.testing.assert_close(value, F.cross_entropy(head.logits(hidden), targets, reduction="sum"))


# ---------------------------------------------------------------------------- the composition


@pytest.mark.parametrize("anchor_name", MATRIX)
def test_composition_loss_and_bridge_gradients_equal_the_full_logits_path(anchor_name):
    composed = composition(anchor_name)
    assert output_head(composed.anchor) is not None  # the chunked path, not a fallback
    batch = prompt_completion_batch()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    expected = reference_loss(composed(**inputs).logits, batch["labels"])
    expected.backward()
    expected_grads = bridge_grads(composed)
    composed.zero_grad(set_to_none=True)

    seen = []
    head = composed.anchor.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    out = composed(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum")
    handle.remove()
    assert out.logits is None and seen == []  # the head module never ran over the batch
    out.loss.backward()

    torch.testing.assert_close(out.loss, expected, **TOL)
    for got, want in zip(bridge_grads(composed), expected_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("mask_mode", ["causal", "prompt"])
def test_labels_argument_gives_the_mean_loss_with_or_without_logits(mask_mode):
    composed = composition("gemma2_softcap", mask_mode)
    batch = prompt_completion_batch(seed=3)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        logits = composed(**inputs).logits
        expected = reference_loss(logits, batch["labels"], reduction="mean")
        with_logits = composed(**inputs, labels=batch["labels"])
        without = composed(**inputs, labels=batch["labels"], return_logits=False)
    torch.testing.assert_close(with_logits.logits, logits)
    torch.testing.assert_close(with_logits.loss, expected, **TOL)
    torch.testing.assert_close(without.loss, expected, **TOL)


def test_every_fallback_gives_the_same_loss_and_gradients(monkeypatch):
    """A head comm cannot apply itself (unknown architecture, or a weight partitioned away) is
    asked for its logits at the loss positions; without that, every logit is computed."""
    import comm_cli.losses as losses_module  # where a composition's loss looks up its head

    batch = prompt_completion_batch(seed=5)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    results = []
    for path in ("chunked", "kept_logits", "full_logits"):
        monkeypatch.undo()
        if path != "chunked":
            monkeypatch.setattr(losses_module, "output_head", lambda model: None)
        if path == "full_logits":
            monkeypatch.setattr(losses_module, "keeps_loss_logits", lambda model: False)
        composed = composition("cohere")
        out = composed(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum")
        out.loss.backward()
        results.append((out.loss.detach(), bridge_grads(composed)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], **TOL)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, **TOL)


def test_training_batch_loss_of_a_composition_is_the_summed_reference():
    composed = composition("granite")
    batch = prompt_completion_batch(seed=7)
    expected = reference_loss(composed(batch["input_ids"], batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(batch_loss(composed, batch, composed=True), expected, **TOL)


# ---------------------------------------------------------------------------- baselines (plain models)


@pytest.mark.parametrize("name", MATRIX)
def test_plain_model_loss_and_every_gradient_equal_the_full_logits_path(name):
    """Full fine-tuning: every weight trains, the (possibly tied) head included."""
    model = matrix_model(name).requires_grad_(True)
    batch = prompt_completion_batch(seed=2)
    expected = reference_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape))
    loss = batch_loss(model, batch, composed=False)
    handle.remove()
    assert seen == [(int(loss_mask(batch["labels"]).sum()), VOCAB)]  # logits of the loss positions only
    loss.backward()

    torch.testing.assert_close(loss, expected, **TOL)
    for n, p in model.named_parameters():
        if n in expected_grads:
            torch.testing.assert_close(p.grad, expected_grads[n], **TOL, msg=n)


def test_lora_loss_and_gradients_equal_the_full_logits_path():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("qwen3", width=48), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = prompt_completion_batch(seed=4)
    expected = reference_loss(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    expected.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    expected_grads = [p.grad.clone() for p in trained]
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, batch, composed=False)
    loss.backward()
    torch.testing.assert_close(loss, expected, **TOL)
    for p, want in zip(trained, expected_grads):
        torch.testing.assert_close(p.grad, want, **TOL)


def test_next_token_loss_over_full_logits_matches_the_reference():
    logits = torch.randn(3, 9, 17, requires_grad=True)
    labels = torch.randint(0, 17, (3, 9))
    labels[:, :4] = IGNORE_INDEX
    for reduction in ("mean", "sum"):
        torch.testing.assert_close(
            next_token_loss(logits, labels, reduction), reference_loss(logits, labels, reduction), **TOL
        )
    with pytest.raises(ValueError, match="reduction"):
        hidden_states_loss(
            torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), OutputHead(torch.randn(5, 4)), "none"
        )


# ---------------------------------------------------------------------------- optional CUDA libraries


def _fake_libraries(monkeypatch, liger=True, cce=True):
    calls = []

    def fused(hidden, weight, targets, bias=None, softcap=None, reduction="mean", **_):
        calls.append(dict(hidden=hidden, softcap=softcap, reduction=reduction))
        logits = OutputHead(weight, bias, 1.0, softcap).logits(hidden)
        return F.cross_entropy(logits.float(), targets, reduction=reduction)

    for present, names in (
        (liger, ("liger_kernel", "liger_kernel.transformers.functional")),
        (cce, ("cut_cross_entropy",)),
    ):
        for name in names:
            if present:
                module = types.ModuleType(name)
                module.liger_fused_linear_cross_entropy = lambda *a, **k: (fused(*a, **k), None)
                module.linear_cross_entropy = fused
                monkeypatch.setitem(sys.modules, name, module)
            else:
                monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    return calls


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv(linear_ce.BACKEND_ENV, raising=False)
    head, scaled_with_bias = OutputHead(torch.randn(5, 4)), OutputHead(torch.randn(5, 4), torch.randn(5), 0.5)
    _fake_libraries(monkeypatch, liger=True, cce=True)
    assert select_backend("cpu", head) == "torch"  # the libraries need CUDA
    assert select_backend("cuda", head) == "liger"
    assert select_backend("cuda", scaled_with_bias) == "torch"  # a scale after a bias: only torch fits
    monkeypatch.setenv(linear_ce.BACKEND_ENV, "cce")
    assert select_backend("cuda", head) == "cce"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        select_backend("cpu", head)
    monkeypatch.setenv(linear_ce.BACKEND_ENV, "torch")
    assert select_backend("cuda", head) == "torch"
    monkeypatch.setenv(linear_ce.BACKEND_ENV, "fast")
    with pytest.raises(ConfigError, match="not one of auto, torch, liger, cce"):
        select_backend("cpu", head)

    monkeypatch.delenv(linear_ce.BACKEND_ENV)
    _fake_libraries(monkeypatch, liger=False, cce=True)
    assert select_backend("cuda", head) == "cce"
    _fake_libraries(monkeypatch, liger=False, cce=False)
    assert select_backend("cuda", head) == "torch"
    with pytest.raises(ConfigError, match="pip install liger-kernel"):
        select_backend("cuda", head, backend="liger")


@pytest.mark.parametrize("library", ["liger", "cce"])
@pytest.mark.parametrize("scale, softcap", [(0.5, None), (1.0, 0.5)])
def test_library_backends_receive_the_head_extras(monkeypatch, library, scale, softcap):
    """Cohere/Granite scales fold into the hidden states; soft-capping and the summed reduction
    are passed on. (The libraries themselves need CUDA: stand-ins that compute the reference.)"""
    calls = _fake_libraries(monkeypatch)
    g = torch.Generator().manual_seed(0)
    head = OutputHead(torch.randn(13, 8, generator=g), None, scale, softcap)
    hidden, targets = torch.randn(7, 8, generator=g), torch.randint(0, 13, (7,), generator=g)
    got = linear_ce.backend_function(library)(hidden, head, targets)
    torch.testing.assert_close(got, torch_linear_cross_entropy(hidden, head, targets), **TOL)
    assert calls[-1]["softcap"] == softcap and calls[-1]["reduction"] == "sum"


def test_a_partitioned_head_weight_falls_back_to_the_models_own_head():
    """DeepSpeed ZeRO-3 (or FSDP2 outside a module's forward) leaves a weight comm cannot multiply
    by: the composition then asks the anchor for its logits at the loss positions instead."""
    composed = composition("llama")
    batch = prompt_completion_batch(seed=9)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    expected = reference_loss(composed(**inputs).logits, batch["labels"])
    composed.anchor.get_output_embeddings().weight.ds_id = 7  # how ZeRO-3 marks a partitioned parameter
    assert output_head(composed.anchor) is None
    seen = []
    handle = composed.anchor.get_output_embeddings().register_forward_hook(
        lambda m, a, out: seen.append(out.shape)
    )
    loss = composed(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum").loss
    handle.remove()
    assert seen == [(int(loss_mask(batch["labels"]).sum()), VOCAB)]
    torch.testing.assert_close(loss, expected, **TOL)


@contextlib.contextmanager
def _partitioned_head(head: torch.nn.Linear, kind: str):
    """The head's weight as a sharding library leaves it between forwards, whole only inside the
    head's own forward (its pre-forward hook gathers it, its post-forward hook re-partitions):

    - "zero3": DeepSpeed ZeRO-3 swaps the parameter's data for an empty tensor of shape (0,) and
      records the real size in ``ds_numel``/``ds_shape`` (no ``ds_id`` here: the shape alone must
      stop comm from multiplying by it);
    - "dtensor": FSDP2 / tensor parallelism register a DTensor (a one-process gloo mesh)."""
    full = head.weight.data
    if kind == "zero3":
        empty = torch.empty(0, dtype=full.dtype)
        head.weight.ds_numel, head.weight.ds_shape = full.numel(), tuple(full.shape)
        head.weight.data = empty
        gather = lambda m, args: setattr(m.weight, "data", full)  # noqa: E731
        release = lambda m, args, out: setattr(m.weight, "data", empty)  # noqa: E731
        cleanup = lambda: setattr(head.weight, "data", full)  # noqa: E731
    else:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import Shard, distribute_tensor

        if dist.is_initialized():
            pytest.skip("a process group is already initialised in this process")
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        whole = head.weight
        sharded = torch.nn.Parameter(
            distribute_tensor(full, DeviceMesh("cpu", [0]), [Shard(0)]), requires_grad=False
        )
        head.weight = sharded
        gather = lambda m, args: setattr(m, "weight", whole)  # noqa: E731
        release = lambda m, args, out: setattr(m, "weight", sharded)  # noqa: E731

        def cleanup():
            head.weight = whole
            dist.destroy_process_group()

    handles = [head.register_forward_pre_hook(gather), head.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        cleanup()


@pytest.mark.parametrize("kind", ["zero3", "dtensor"])
def test_a_sharded_head_weight_is_never_used_directly_and_the_loss_is_unchanged(kind):
    """output_head refuses a weight that is not a whole matrix outside the head's forward (an
    empty ZeRO-3 partition, a DTensor): the composition asks the anchor for the logits at the
    loss positions, through its own (gathering) head, and gets the full-logits loss."""
    composed = composition("llama")
    batch = prompt_completion_batch(seed=11)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    head = composed.anchor.get_output_embeddings()
    with torch.no_grad():
        expected = reference_loss(composed(**inputs).logits, batch["labels"])
        assert output_head(composed.anchor) is not None  # whole: the chunked path
        with _partitioned_head(head, kind):
            assert output_head(composed.anchor) is None
            seen = []
            spy = head.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
            loss = composed(**inputs, labels=batch["labels"], return_logits=False, loss_reduction="sum").loss
            spy.remove()
            if kind == "zero3":
                assert head.weight.shape == (0,)  # partitioned again after the forward
    assert seen == [(int(loss_mask(batch["labels"]).sum()), VOCAB)]  # the model's own head ran once
    torch.testing.assert_close(loss, expected, **TOL)
