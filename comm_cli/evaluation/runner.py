"""Running the evaluation tasks of a config against one model.

Loss is teacher-forced over the tokenised rows (loss on completion tokens, or all tokens for
text). Generation metrics decode the prompt rows in batches through the model's KV-cached
``generate`` (a composition's own, or transformers' for plain models) and score the decoded
continuation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import send_to_device

from comm_cli.compose import ComposedModel
from comm_cli.data.build import eval_rows
from comm_cli.data.collate import CompletionCollator
from comm_cli.data.tokenize import tokenize_split
from comm_cli.evaluation import metrics as M
from comm_cli.evaluation.models import EvalModel
from comm_cli.losses import loss_token_count
from comm_cli.training.models import augment_pad_ids, batch_loss

logger = logging.getLogger(__name__)


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    n: int
    predictions: list[dict] = field(default_factory=list)


def _prompt_ids(tokenizer, prompts: list[str], add_bos: bool) -> list[list[int]]:
    """Prompt ids exactly as training tokenised them: [bos] + prompt."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [[tokenizer.bos_token_id, *row] for row in ids]
    return ids


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.tensor(row)
            mask[i, length - len(row) :] = 1
    return ids.to(device), mask.to(device)


class TaskRunner:
    def __init__(self, model: EvalModel, tokenizer, generation_cfg, cfg, seed: int, progress: bool = True):
        """``cfg``: the whole eval config, which a synthetic task's generator reads its section of."""
        self.model, self.tokenizer, self.generation = model, tokenizer, generation_cfg
        self.cfg, self.seed, self.progress = cfg, seed, progress

    def run(self, name: str, task) -> TaskResult:
        rows = eval_rows(task.data, self.cfg, self.seed, task.max_examples)
        result = TaskResult(task=name, metrics={}, n=len(rows))
        if "loss" in task.metrics:
            loss = self.loss(rows, task)
            result.metrics.update({"loss": loss, "perplexity": M.perplexity(loss)})
        generation_metrics = [m for m in task.metrics if m != "loss"]
        if generation_metrics:
            self.generation_metrics(name, rows, task, generation_metrics, result)
        return result

    @torch.no_grad()
    def loss(self, rows, task) -> float:
        plan = self.model.read_plan
        tokenized, _ = tokenize_split(rows, self.tokenizer, task.data, plan=plan)
        collate = CompletionCollator(self.tokenizer.pad_token_id, augment_pad_ids=augment_pad_ids(plan))
        total, tokens = 0.0, 0
        model, batch_size = self.model.model, self.generation.batch_size
        for start in range(0, len(tokenized), batch_size):
            batch = collate([tokenized[i] for i in range(start, min(start + batch_size, len(tokenized)))])
            batch = send_to_device(batch, self.model.device)
            total += batch_loss(model, batch, composed=isinstance(model, ComposedModel)).item()
            tokens += int(loss_token_count(batch["labels"]))
        return total / max(tokens, 1)

    @torch.no_grad()
    def generation_metrics(self, name, rows, task, wanted, result: TaskResult) -> None:
        from tqdm.auto import tqdm

        # check_tasks (evaluation.recipe) has made sure this is prompt/completion data
        prompt_field, completion_field = task.data.prompt_field, task.data.completion_field
        prompts = [str(p) for p in rows[prompt_field]]
        references = [str(c) for c in rows[completion_field]]
        gen = self.generation
        samples = gen.num_samples if gen.do_sample else 1
        max_new = task.max_new_tokens or gen.max_new_tokens
        tok = self.tokenizer
        eos = tok.eos_token_id
        generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        prompt_ids = _prompt_ids(tok, prompts, task.data.add_bos)
        predictions: list[list[str]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # similar lengths batch well
        batches = [order[i : i + gen.batch_size] for i in range(0, len(order), gen.batch_size)]
        for batch in tqdm(batches, desc=f"{name}", disable=not self.progress, leave=False):
            ids, mask = _left_pad([prompt_ids[i] for i in batch], tok.pad_token_id, self.model.device)
            texts = [prompts[i] for i in batch]
            for _ in range(samples):
                new = self.model.generate(
                    ids, mask, gen, max_new, eos, tok.pad_token_id, generator, prompts=texts
                )
                for row, i in zip(new.tolist(), batch):
                    if eos is not None and eos in row:
                        row = row[: row.index(eos)]
                    predictions[i].append(tok.decode(row, skip_special_tokens=True))
        extract = M.extractor(task.extract, task.regex)
        first = [p[0] for p in predictions]
        correct = [M.exact_match(p, [r] * len(p), extract) for p, r in zip(predictions, references)]
        if "exact_match" in wanted:
            result.metrics["exact_match"] = sum(sum(c) for c in correct) / max(
                1, sum(len(c) for c in correct)
            )
            if samples > 1:
                result.metrics[f"pass@{samples}"] = sum(any(c) for c in correct) / max(1, len(correct))
        if "chrf" in wanted:
            result.metrics["chrf"] = M.chrf(first, references)
        if "bleu" in wanted:
            result.metrics["bleu"] = M.bleu(first, references)
        for prompt, preds, reference, marks in zip(prompts, predictions, references, correct):
            result.predictions.append(
                {
                    "task": name,
                    "prompt": prompt,
                    "prediction": preds[0] if samples == 1 else preds,
                    "reference": reference,
                    "extracted": extract(preds[0]),
                    "correct": marks[0] if samples == 1 else marks,
                }
            )
