"""The character alignment's cost (comm_cli/compose/alignment.py): one composition whose augment
reads its own tokens (same tokenizer, tokens="aligned") against the same models reading the
anchor's ids, for a training step and per generated token; and, as information, an augment that
reads characters. Vocab: a byte-level BPE trained in-process on random text (bpe_text.py)."""

from __future__ import annotations

import functools

import torch

from benchmarks.bpe_text import BenchText, bench_tokenizer, cut_to_tokens
from benchmarks.measure import time_interleaved
from benchmarks.models import PRESETS, base_dtype, build_models, compose, mapping_and_bridge, with_values
from comm_cli.compose.text import to_device
from comm_cli.training.models import batch_loss


class AlignedVariants:
    """One composition (the default preset's models, vocab = the bench tokenizer's) read three
    ways over the SAME frozen weights and bridges, with batches built by comm-train's own data
    pipeline (``tokenize_split`` with the composition's ReadPlan, then ``CompletionCollator``):

    - shared:  the augment reads the anchor's ids (the plain path, masks by column);
    - aligned: the augment has the same tokenizer but reads its own tokens through the character
      alignment (``AugmentSpec.tokens="aligned"``): masks from settle points and token ends,
      positions on the character scale. The only difference from shared is the alignment;
    - cross:   the augment reads characters (comm's character tokenizer) while the anchor reads
      BPE: several augment tokens per anchor token, so more augment compute (information only).
    """

    PATHS = ("shared", "aligned", "cross")

    def __init__(self, args, device):
        import datasets

        from comm_cli.compose.alignment import check_settle_rule
        from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids
        from comm_cli.data.char_tokenizer import build_char_tokenizer
        from comm_cli.data.loading import DataConfig
        from comm_cli.data.tokenize import tokenize_split

        self.args, self.device = args, device
        target_vocab = args.vocab or PRESETS[args.preset]["vocab"]
        source = BenchText(target_vocab)
        self.tokenizer = tokenizer = bench_tokenizer(source.corpus(), target_vocab)
        chars = build_char_tokenizer()
        # rows of about --seq anchor tokens: bos + (seq - 2) text tokens + eos
        texts = [
            cut_to_tokens(tokenizer, source.text(12 * args.seq), args.seq - 2) for _ in range(args.batch)
        ]
        self.prompt = cut_to_tokens(tokenizer, source.text(12 * args.prompt), args.prompt - 1)

        anchor, augment = build_models(with_values(args, vocab=len(tokenizer)), base_dtype(device), device)
        self.composed, self.optimizer = compose(anchor, augment, *mapping_and_bridge(args))

        # how comm decides the readers: use_tokenizers (tokens="aligned" forces the aligned path)
        self.plans = {"shared": None}
        spec = self.composed.config.augments[0]
        for path, augment_tokenizer, tokens in (("aligned", tokenizer, "aligned"), ("cross", chars, "auto")):
            spec.tokens = tokens
            self.composed.use_tokenizers(tokenizer, [augment_tokenizer], texts)
            self.plans[path] = plan = self.composed.read_plan()
            assert plan is not None, path
            check_settle_rule(plan.augment_readers[0], texts[:2])  # the rule holds on the bench's texts

        # comm-train's pipeline: tokenize_split (with the plan) -> CompletionCollator
        datasets.disable_progress_bars()
        dataset = datasets.Dataset.from_dict({"text": texts})
        data = DataConfig(format="text", max_length=args.seq)
        self.batches = {}
        for path, plan in self.plans.items():
            split, _ = tokenize_split(dataset, tokenizer, data, split_name=f"bench {path}", plan=plan)
            collate = CompletionCollator(
                tokenizer.pad_token_id, padding_side="right", augment_pad_ids=augment_pad_ids(plan)
            )
            self.batches[path] = to_device(collate([split[i] for i in range(len(split))]), device)
        for path in ("aligned", "cross"):  # the anchor reads the same ids on every path
            assert torch.equal(self.batches[path]["input_ids"], self.batches["shared"]["input_ids"])
        self.prompt_ids = torch.tensor([tokenizer(self.prompt)["input_ids"]], device=device)
        self.generated: dict[str, torch.Tensor] = {}

    def tokens_per_row(self, path: str) -> dict[str, float]:
        batch = self.batches[path]
        anchor = batch["attention_mask"].sum(1).float().mean().item()
        inputs = batch.get("augment_inputs")
        augment = inputs[0]["attention_mask"].sum(1).float().mean().item() if inputs else anchor
        return {"anchor": anchor, "augment": augment}

    def _use(self, path: str) -> None:
        """Attach the path's readers (generation reads them; a training forward reads its batch)."""
        plan = self.plans[path]
        if plan is None:
            self.composed.set_readers(self.tokenizer, None, [None])
        else:
            self.composed.set_readers(self.tokenizer, plan.anchor_reader, plan.augment_readers)

    def _step(self, path: str):
        """One comm-train step on the path's batch: batch_loss, backward, AdamW over the bridges."""
        self._use(path)  # the model refuses anchor ids alone while an aligned reader is attached
        batch_loss(self.composed, self.batches[path], composed=True, reduction="mean").backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _generate(self, path: str):
        """Greedy KV-cached decoding of --new-tokens after the prompt (no eos: every token is
        generated); the aligned paths feed the augment its settled tokens as the text grows."""
        self._use(path)
        prompts = None if path == "shared" else [self.prompt]
        out = self.composed.generate(
            self.prompt_ids, max_new_tokens=self.args.new_tokens, eos_token_id=[], prompts=prompts
        )
        self.generated[path] = out[0, self.prompt_ids.shape[1] :]

    def generated_characters(self) -> dict[str, int]:
        """How much text each path's last generation spelled (random weights may spell little)."""
        return {
            path: len(self.tokenizer.decode(ids, skip_special_tokens=True))
            for path, ids in self.generated.items()
        }

    def steps(self) -> dict:
        return {f"{path}_step": functools.partial(self._step, path) for path in self.PATHS}

    def generations(self) -> dict:
        return {f"{path}_generate": functools.partial(self._generate, path) for path in self.PATHS}


def aligned_case(args, device) -> dict:
    """Aligned and character augments against shared ids: step time and decoding per token."""
    variants = AlignedVariants(args, device)
    times = time_interleaved(variants.steps(), device, args.warmup, args.repeats)
    generation = time_interleaved(variants.generations(), device, 1, max(5, args.repeats // 2))
    per_token = {name: seconds / args.new_tokens for name, seconds in generation.items()}
    return {
        "aligned_step_over_shared_step": times["aligned_step"] / times["shared_step"],
        "aligned_generation_over_shared_generation": per_token["aligned_generate"]
        / per_token["shared_generate"],
        "cross_step_over_shared_step": times["cross_step"] / times["shared_step"],
        "cross_generation_over_shared_generation": per_token["cross_generate"] / per_token["shared_generate"],
        "cross_note": "cross: anchor byte-level BPE, augment characters (information, no target): the augment "
        "reads several tokens per anchor token, so it computes more; the ratio is not the alignment's overhead",
        "seconds": times,
        "generation_seconds_per_token": per_token,
        "tokens_per_row": {path: variants.tokens_per_row(path) for path in variants.PATHS},
        "generated_characters": variants.generated_characters(),
        "new_tokens": args.new_tokens,
        "prompt_tokens": int(variants.prompt_ids.shape[1]),
        "vocab": len(variants.tokenizer),
        "batch": args.batch,
        "seq": args.seq,
    }
