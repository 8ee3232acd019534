"""Running the evaluation tasks of a config against one model.

Loss is teacher-forced over the tokenised rows (loss on completion tokens, or all tokens for
text). Generation metrics decode the prompt rows in batches through the model's KV-cached
``generate`` (a composition's own, or transformers' for plain models), cut at the task's stop
strings, and score the decoded continuation. Code benchmarks (``pass_at_k``) run each completion
against the problem's tests in a separate process (``execution``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import send_to_device

from comm_cli.compose import ComposedModel
from comm_cli.compose.encoding import CompletionCollator, augment_pad_ids
from comm_cli.data.build import eval_rows
from comm_cli.data.tokenize import tokenize_split
from comm_cli.errors import ConfigError
from comm_cli.evaluation import code_tasks as C
from comm_cli.evaluation import metrics as M
from comm_cli.evaluation.execution import Limits, run_programs
from comm_cli.evaluation.models import EvalModel
from comm_cli.evaluation.stopping import StopStrings, cut_at_stops
from comm_cli.losses import loss_token_count
from comm_cli.training.models import batch_loss

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


@torch.no_grad()
def generate_texts(
    model: EvalModel,
    tokenizer,
    prompt_ids,
    generation,
    max_new: int,
    stops,
    generator,
    progress=True,
    desc="",
    prompts: list[str] | None = None,
) -> list[list[str]]:
    """``generation.num_samples`` continuations (one when greedy) of every tokenised prompt,
    batched (similar lengths together, left-padded) through the model's KV-cached ``generate``,
    each ended at eos or its first stop string and cut there. ``prompts``: the prompt texts (a
    composition whose augment has its own tokenizer reads them)."""
    from tqdm.auto import tqdm

    samples = generation.num_samples if generation.do_sample else 1
    stopping = StopStrings(tokenizer, stops) if stops else None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    outputs: list[list[str]] = [[] for _ in prompt_ids]
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    size = generation.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, mask = _left_pad([prompt_ids[i] for i in batch], pad, model.device)
        for _ in range(samples):
            texts = [prompts[i] for i in batch] if prompts is not None else None
            new = model.generate(ids, mask, generation, max_new, eos, pad, generator, stopping, prompts=texts)
            for row, i in zip(new.tolist(), batch):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                outputs[i].append(cut_at_stops(tokenizer.decode(row, skip_special_tokens=True), stops or []))
    return outputs


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user turn of the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "chat_template=true needs a tokenizer with a chat template (an instruct model's): this one has "
            "none; set the task's chat_template=false"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


class TaskRunner:
    def __init__(self, model: EvalModel, tokenizer, generation_cfg, cfg, seed: int, progress: bool = True):
        """``cfg``: the whole eval config, which a synthetic task's generator reads its section of."""
        self.model, self.tokenizer, self.generation = model, tokenizer, generation_cfg
        self.cfg, self.seed, self.progress = cfg, seed, progress

    def run(self, name: str, task) -> TaskResult:
        if "pass_at_k" in task.metrics:  # check_tasks allows no other metric beside it
            result = TaskResult(task=name, metrics={}, n=0)
            self.code_metrics(name, task, result)
            return result
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

    def generate(
        self, name: str, prompts: list[str], add_bos: bool, max_new: int, stops, chat: bool = False
    ) -> list[list[str]]:
        """``generation.num_samples`` continuations of every prompt (one when greedy); ``chat``:
        each prompt as a user turn of the chat template (which brings its own special tokens)."""
        generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        if chat:
            prompts, add_bos = [chat_prompt(self.tokenizer, p) for p in prompts], False
        prompt_ids = _prompt_ids(self.tokenizer, prompts, add_bos)
        return generate_texts(
            self.model,
            self.tokenizer,
            prompt_ids,
            self.generation,
            max_new,
            stops,
            generator,
            self.progress,
            name,
            prompts=prompts,
        )

    def generation_metrics(self, name, rows, task, wanted, result: TaskResult) -> None:
        # check_tasks (evaluation.recipe) has made sure this is prompt/completion data
        prompt_field, completion_field = task.data.prompt_field, task.data.completion_field
        prompts = [str(p) for p in rows[prompt_field]]
        references = [str(c) for c in rows[completion_field]]
        samples = self.generation.num_samples if self.generation.do_sample else 1
        max_new = self.generation.max_new_tokens if task.max_new_tokens is None else task.max_new_tokens
        if task.fit_to_references and references:
            longest = max(
                len(ids) for ids in self.tokenizer(references, add_special_tokens=False)["input_ids"]
            )
            max_new = min(max_new, longest + 8)
        predictions = self.generate(
            name, prompts, task.data.add_bos, max_new, list(task.stop), chat=task.chat_template
        )
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

    def code_metrics(self, name, task, result: TaskResult) -> None:
        """Generate completions of every problem, run each against its tests in a separate
        process (``execution.run_programs``) and report the unbiased pass@k."""
        code = task.code
        rows = eval_rows(C.data_config(task.data, code.benchmark), self.cfg, self.seed, task.max_examples)
        problems = C.problems(rows, code.benchmark)
        result.n = len(problems)
        chat = task.chat_template
        # a chat reply ends at the template's end of turn; the code stops would cut its function short
        stops = list(code.stop) if code.stop is not None else ([] if chat else C.STOPS[code.benchmark])
        max_new = self.generation.max_new_tokens if task.max_new_tokens is None else task.max_new_tokens
        requests = [C.chat_request(p) if chat else p.prompt for p in problems]
        completions = self.generate(name, requests, task.data.add_bos, max_new, stops, chat=chat)
        programs = [p.program(c, chat=chat) for p, samples in zip(problems, completions) for c in samples]
        logger.info(
            "%s: running %d programs (timeout %ss, %d MiB each)",
            name,
            len(programs),
            code.timeout,
            code.memory_mb,
        )
        outcomes = iter(run_programs(programs, Limits(code.timeout, code.memory_mb), code.workers))
        marks = [[next(outcomes) for _ in samples] for samples in completions]
        result.metrics.update(M.mean_pass_at_k([[o.passed for o in m] for m in marks], code.k))
        for problem, samples, outcome in zip(problems, completions, marks):
            single = len(samples) == 1
            result.predictions.append(
                {
                    "task": name,
                    "task_id": problem.task_id,
                    "prompt": problem.prompt,
                    "prediction": samples[0] if single else samples,
                    "reference": problem.reference,
                    "correct": outcome[0].passed if single else [o.passed for o in outcome],
                    "status": outcome[0].status if single else [o.status for o in outcome],
                }
            )
