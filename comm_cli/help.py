"""The ``--help`` page of each command: what it does, a few examples, the config groups it accepts
with their options, and where the full config is. Written here instead of Hydra's stock page
(which lists every directory under conf/, groups the command rejects included, and dumps the
whole config); ``--hydra-help`` still shows Hydra's own options.
"""

from __future__ import annotations

from pathlib import Path

PAGES = {
    "comm-train": {
        "what": (
            "Train a CALM composition: a frozen anchor LM joined to frozen augmenting model(s) by\n"
            "cross-attention bridges; only the bridges learn. Overrides are key=value (Hydra)."
        ),
        "examples": [
            (
                "comm-train anchor.name_or_path=ANCHOR augment.name_or_path=AUGMENT data.data_files=train.jsonl",
                "your pair (hub ids or directories), comm's general settings",
            ),
            (
                "comm-train anchor=qwen2_5_1_5b augment=qwen2_5_coder_0_5b data.data_files=train.jsonl",
                "presets",
            ),
            ("comm-train experiment=kv_arithmetic", "the paper's key-value experiment (a built-in)"),
            ("comm-train ... method=lora", "the LoRA baseline on the same data"),
            ("comm-train ... resume=auto", "continue a stopped run from its newest checkpoint"),
            (
                "comm-train ... trainer.log_every=20 trainer.eval_every=100",
                "each bridge's output/state ratio, entropy and gate every 20 steps, held-out loss every 100;"
                " a plateau is named (trainer.plateau_*)",
            ),
            (
                "comm-launch ddp anchor=... augment=... data.data_files=train.jsonl",
                "every GPU of this machine",
            ),
        ],
        "groups": [
            "experiment",
            "anchor",
            "augment",
            "mapping",
            "data",
            "method",
            "optimizer",
            "scheduler",
            "trainer",
            "logger",
        ],  # fmt: skip
        "added": {"size": "+size=NAME shrinks a key-value experiment (plumbing checks)"},
    },
    "comm-eval": {
        "what": (
            "Evaluate a saved composition (checkpoint=DIR) or a baseline (model=anchor|augment|lora|full):\n"
            "prints a table and writes results.json in outputs/eval_<what it evaluated>."
        ),
        "examples": [
            (
                "comm-eval checkpoint=outputs/run/composition data.data_files=test.jsonl",
                "loss and exact match on your file, bridges on and off",
            ),
            ("comm-eval checkpoint=outputs/kv_arithmetic/composition", "a run, with its experiment's tasks"),
            (
                "comm-eval model=anchor anchor.name_or_path=ANCHOR data.data_files=test.jsonl",
                "a base model alone",
            ),
            ("comm-eval checkpoint=DIR harness.tasks=[arc_easy,gsm8k]", "lm-evaluation-harness tasks"),
            (
                "comm-eval checkpoint=DIR data.data_files=test.jsonl attention_maps=true",
                "a PNG per bridge of where each head looks in the augment (attention_map_examples=3)",
            ),
            (
                "comm-eval suite=code checkpoint=DIR execute_untrusted_code=true",
                "HumanEval and MBPP, executed",
            ),
        ],  # fmt: skip
        "groups": ["suite", "anchor", "augment", "logger"],
        "added": {"task": "+task@tasks.NAME=PRESET adds a task (tasks.NAME.<key>=... sets its options)"},
    },
    "comm-serve": {
        "what": (
            "Serve a saved composition (checkpoint=DIR) or a baseline (model=anchor|augment|lora|full) over\n"
            "the OpenAI HTTP API: /v1/models, /v1/completions, /v1/chat/completions (the anchor's chat\n"
            "template), streamed by server-sent events; requests that arrive together share a batch.\n"
            "Listens on 127.0.0.1 unless host= says otherwise; a request's unset settings come from\n"
            "generation.* (greedy by default). Needs pip install 'comm-cli[serve]'."
        ),
        "examples": [
            ("comm-serve checkpoint=outputs/run/composition", "http://127.0.0.1:8000/v1, model id 'run'"),
            (
                "comm-serve checkpoint=DIR port=9000 served_model_name=calm generation.max_new_tokens=512",
                "another port, name and default reply length",
            ),
            ("comm-serve checkpoint=DIR bridges_off=true", "the anchor alone, to compare"),
            ("comm-serve model=anchor anchor.name_or_path=ANCHOR", "a base model"),
            (
                "comm-serve checkpoint=DIR max_batch_size=32 batch_wait_ms=10 max_queue=256",
                "batching and queue (past max_queue waiting requests: 503)",
            ),
        ],
        "groups": ["anchor", "augment"],
        "added": {},
        "standalone": True,
        "keys": "generation.max_new_tokens=512, port=9000, device=cuda, dtype=bfloat16",
    },
    "comm-generate": {
        "what": (
            "Generate text with a saved composition (checkpoint=DIR) or a baseline\n"
            "(model=anchor|augment|lora|full). Prompts from prompt=, prompts_file= (.txt one a line, .jsonl\n"
            'with a "prompt" field) or stdin; one jsonl line a prompt (prompt, completion, finish_reason,\n'
            "token counts, settings) to output=FILE or stdout. A single prompt on a terminal streams its reply\n"
            "instead (stream=true|false to choose). The anchor's chat template poses each prompt when it has\n"
            "one (chat_template=false: plain text; system='...' adds a system turn)."
        ),
        "examples": [
            ("comm-generate checkpoint=outputs/run/composition prompt='12+7='", "one prompt, streamed"),
            (
                "comm-generate checkpoint=DIR prompts_file=test.jsonl output=out.jsonl batch_size=32",
                "a file, batched",
            ),
            ("cat prompts.txt | comm-generate checkpoint=DIR > out.jsonl", "prompts on stdin"),
            (
                "comm-generate checkpoint=DIR prompt='...' bridges_off=true",
                "the anchor alone, for comparison",
            ),
            (
                "comm-generate checkpoint=DIR prompt='...' generation.do_sample=true generation.temperature=0.7 seed=1",
                "sampling",
            ),
            (
                "comm-generate checkpoint=DIR prompt='...' system='Answer briefly.'",
                "a system turn (chat template)",
            ),
            ("comm-generate model=anchor anchor.name_or_path=ANCHOR prompt='...'", "a base model alone"),
        ],  # fmt: skip
        "groups": ["anchor", "augment"],
        "added": {},
        "standalone": True,  # no experiment sections: presets that name a model by themselves
        "keys": "generation.max_new_tokens=64, device=cuda, dtype=bfloat16",
    },
    "comm-chat": {
        "what": (
            "Chat in the terminal with a saved composition (checkpoint=DIR) or a baseline, through the\n"
            "anchor's chat template (without one: plain text, the conversation joined), replies streamed. In the chat:\n"
            "/reset forgets the conversation, /bridges off|on switches the bridges (what the augment adds),\n"
            "/help lists the commands; Ctrl-C stops a reply, Ctrl-D leaves. Lines piped on stdin are turns."
        ),
        "examples": [
            ("comm-chat checkpoint=outputs/run/composition", "chat with a trained composition"),
            (
                "comm-chat checkpoint=DIR system='You are terse.' generation.max_new_tokens=512",
                "a system turn",
            ),
            ("comm-chat checkpoint=DIR generation.do_sample=true generation.top_p=0.9", "sampled replies"),
            ("comm-chat model=anchor anchor.name_or_path=ANCHOR", "the anchor alone"),
        ],  # fmt: skip
        "groups": ["anchor", "augment"],
        "added": {},
        "standalone": True,
        "keys": "generation.max_new_tokens=512, device=cuda, dtype=bfloat16",
    },
}


def accepted_groups(program: str) -> set[str]:
    """The config groups a command takes (its page lists exactly these)."""
    spec = PAGES[program]
    return {*spec["groups"], *spec["added"]}


def options(conf_dir: str | Path, group: str, standalone: bool = False) -> list[str]:
    """The presets of ``group``; ``standalone``: only those that name their model by themselves
    (not through an experiment's section, ``${kv.dir}/anchor``, which the use commands lack)."""
    from omegaconf import OmegaConf

    def by_itself(path: Path) -> bool:
        preset = OmegaConf.load(path)
        return not any(OmegaConf.is_interpolation(preset, key) for key in preset)

    paths = sorted((Path(conf_dir) / group).glob("*.yaml"))
    return [p.stem for p in paths if not standalone or by_itself(p)]


def page(program: str, conf_dir: str | Path) -> str:
    spec = PAGES[program]
    lines = [f"{program}: {spec['what']}", "", "Examples:"]
    for command, why in spec["examples"]:
        lines += [f"  # {why}", f"  {command}"]
    lines += ["", "Config groups (GROUP=OPTION):"]
    for group in spec["groups"]:
        lines.append(f"  {group}: {', '.join(options(conf_dir, group, spec.get('standalone', False)))}")
    for group, how in spec["added"].items():
        lines.append(f"  {group}: {', '.join(options(conf_dir, group))}  ({how})")
    lines += [
        "",
        f"Every key can be set on the command line ({spec.get('keys', 'optimizer.lr=3e-4, trainer.max_steps=2000')}, ...).",
        f"The full config, with every key and its value: {program} ... --cfg job",
        "Library progress bars and logs: verbose=true. Hydra's own options: --hydra-help.",
    ]
    return "\n".join(lines)
