"""What the text case, the prompt/completion case and the sweep time: the cost lower bound
(docs/performance.md, "The cost model"), comm's training step three ways, LoRA on the anchor with the bridges'
parameter budget, and KV-cached greedy decoding, all over the same frozen weights."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks.models import base_dtype, build_models, compose, mapping_and_bridge
from comm_cli.compose import cache_kwarg, find_blocks, resolve_connections
from comm_cli.compose.bridge import bridge_parameter_count
from comm_cli.compose.masks import positions_from_mask
from comm_cli.training.models import batch_loss


def loss_of(logits, labels):
    """Mean float32 cross-entropy over every logit (labels -100 ignored): the unchunked path."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def prompt_labels(ids: torch.Tensor, prompt_fraction: float) -> torch.Tensor:
    """Labels of prompt/completion rows: the first ``prompt_fraction`` of each row carries no loss."""
    labels = ids.clone()
    labels[:, : int(round(ids.shape[1] * prompt_fraction))] = -100
    return labels


class Variants:
    """Everything measured, built once and sharing the same frozen weights. On a GPU every
    variant runs under bf16 autocast, as comm-train's mixed precision does (the fp32 bridge
    weights are then used in bf16 matmuls, their gradients and optimizer state stay fp32)."""

    def __init__(self, args, device, only: str | None = None, lean: bool = False):
        """``only``: build just what that variant needs (a peak-memory child process); ``lean``:
        no LoRA or generation copies (the prompt/completion case and the sweep)."""
        self.args, self.device = args, device
        anchor, augment = build_models(args, base_dtype(device), device)
        self.anchor = anchor.to(device)
        self.vocab = anchor.config.vocab_size
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, self.vocab, (args.batch, args.seq), generator=g).to(device)
        self.mask = torch.ones_like(self.ids)
        self.labels = prompt_labels(self.ids, args.prompt_fraction)
        self.positions = positions_from_mask(self.mask)
        mapping, bridge = mapping_and_bridge(args)
        self.budget = len(
            resolve_connections(mapping, augment.config.num_hidden_layers, anchor.config.num_hidden_layers)
        ) * (bridge_parameter_count(augment.config.hidden_size, anchor.config.hidden_size, bridge))
        self._lora = None
        # copies taken before composing, so the LoRA anchor carries no bridge hooks
        if only is None and not lean:
            self._lora_anchor = copy.deepcopy(self.anchor)
        else:  # a memory child: the LoRA one wraps the anchor itself, the others need no LoRA
            self._lora_anchor = self.anchor if only == "lora_step" else None
        if only == "lora_step":
            return
        copies = only is None and not lean
        self.full_augment = augment if copies else None
        self.augment_config = augment.config
        self.composed, self.optimizer = compose(
            self.anchor, copy.deepcopy(augment) if copies else augment, mapping, bridge
        )
        self.lowest = min(b for _, _, b in self.composed.bridge_connections)
        self.augment_base = self.composed.augments[0]
        if only in (None, "cached_step") and not lean:
            with torch.no_grad():
                self.states = [self.composed.augment_states(0, self.ids, self.mask, self.positions)]
        assert self.budget == self.composed.parameter_counts()["trainable"]

    # -------------------------------------------------------------- the lower bound
    def anchor_fwd_bwd(self):
        """Frozen anchor forward + backward of activation gradients down to the lowest connected
        layer: the layer's output is made a leaf that requires grad, so autograd stops there."""
        layers = find_blocks(self.anchor).layers
        handle = layers[self.lowest].register_forward_hook(lambda m, a, out: out.detach().requires_grad_())
        try:
            logits = self.anchor(input_ids=self.ids, attention_mask=self.mask).logits
            loss_of(logits, self.labels).backward()
        finally:
            handle.remove()

    @torch.no_grad()
    def augment_forward(self):
        self.composed.augment_states(0, self.ids, self.mask, self.positions)

    def lower_bound(self):
        self.augment_forward()
        self.anchor_fwd_bwd()

    # -------------------------------------------------------------- comm
    def _step(self, **kwargs):
        """One comm training step: the loss as comm-train computes it (the anchor's head only at
        loss positions, in chunks), backward, AdamW over the bridges."""
        out = self.composed(self.ids, self.mask, labels=self.labels, return_logits=False, **kwargs)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def calm_step(self):
        self._step()

    def cached_step(self):
        self._step(augment_states=self.states)

    def calm_step_full_logits(self):
        """The same step computing every logit (comm before the chunked loss)."""
        out = self.composed(self.ids, self.mask)
        loss_of(out.logits, self.labels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- LoRA with the same budget
    def lora(self):
        if self._lora is None:
            from peft import LoraConfig, get_peft_model

            anchor = self._lora_anchor
            probe = get_peft_model(anchor, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
            per_rank = sum(p.numel() for p in probe.parameters() if p.requires_grad)
            anchor = probe.unload()
            r = max(1, round(self.budget / per_rank))
            model = get_peft_model(
                anchor, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
            )
            model.eval()  # no dropout, as the composition
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            self._lora = (model, opt, r, sum(p.numel() for p in model.parameters() if p.requires_grad))
        return self._lora

    def lora_step(self):
        model, opt, _, _ = self.lora()
        batch = {"input_ids": self.ids, "attention_mask": self.mask, "labels": self.labels}
        batch_loss(model, batch, composed=False, reduction="mean").backward()  # as comm-train does
        opt.step()
        opt.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def _greedy(self, model, tokens):
        """A plain KV-cached greedy loop over a HF model (no composition)."""
        from transformers import DynamicCache

        ids = self.ids[:1, : self.args.prompt]
        cache = {cache_kwarg(model): DynamicCache(config=model.config)}
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
        for _ in range(tokens - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **cache)

    def anchor_generate(self):
        self._greedy(self.anchor, self.args.new_tokens)

    def augment_generate(self):
        self._greedy(self.full_augment, self.args.new_tokens)

    @torch.no_grad()
    def composed_generate(self):
        ids = self.ids[:1, : self.args.prompt]
        self.composed.generate(ids, max_new_tokens=self.args.new_tokens, eos_token_id=None)
