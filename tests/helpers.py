"""Helpers for the CLI tests: a tiny local workspace (models, tokenizer, data) and readers for
what the trainer writes (W&B offline records, trainable weights)."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


def build_workspace(root: Path) -> dict[str, Path]:
    """Tiny anchor (Llama, width 48) and augment (GPT-NeoX, width 32) sharing a char tokenizer,
    an augment with a different tokenizer, and prompt/completion data."""
    from comm_cli.data.char_tokenizer import build_char_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    vocab = len(tokenizer)
    paths = {name: root / name for name in ("anchor", "augment", "other_augment")}
    tiny_model("llama", width=48, layers=4, vocab=vocab).save_pretrained(paths["anchor"])
    tokenizer.save_pretrained(paths["anchor"])
    tiny_model("gpt_neox", seed=1, width=32, layers=2, vocab=vocab).save_pretrained(paths["augment"])
    tokenizer.save_pretrained(paths["augment"])
    tiny_model("gpt_neox", seed=2, width=32, layers=2, vocab=vocab).save_pretrained(paths["other_augment"])
    _shuffled_tokenizer(tokenizer).save_pretrained(paths["other_augment"])
    rng = random.Random(0)
    rows = []
    for _ in range(240):
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"prompt": f"{x}+{y}=", "completion": str(x + y) + (" ok" if rng.random() < 0.5 else "")})
    paths["data"] = root / "train.jsonl"
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _shuffled_tokenizer(tokenizer):
    """The same characters with other ids: a tokenizer the anchor does not share."""
    import tempfile

    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        specials = {t["content"] for t in data.get("added_tokens", [])}
        plain = sorted((k for k in vocab if k not in specials), key=lambda k: vocab[k])
        ids = sorted(vocab[k] for k in plain)
        for token, new_id in zip(plain, reversed(ids)):
            vocab[token] = new_id
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(data))
        return PreTrainedTokenizerFast.from_pretrained(tmp)


def base_args(ws: dict[str, Path], run_root: Path, name: str = "run") -> list[str]:
    """comm-train overrides for a fast run on the tiny workspace."""
    return [
        f"name={name}",
        f"output_root={run_root}",
        f"anchor.name_or_path={ws['anchor']}",
        f"augment.name_or_path={ws['augment']}",
        "data=jsonl",
        f"data.data_files={ws['data']}",
        "data.validation_fraction=0.1",
        "data.max_length=32",
        "mapping=every4",
        "mapping.every=2",
        "bridge.num_heads=4",
        "bridge.zero_init_output=false",
        "optimizer.lr=3e-3",
        "trainer.max_steps=12",
        "trainer.batch_size=4",
        "trainer.eval_every=6",
        "trainer.eval_batches=2",
        "trainer.save_every=4",
        "trainer.log_every=2",
        "trainer.keep_last=2",
        "trainer.progress_bar=false",
        "logger=none",
    ]


def cli_env(cache_dir: Path | None = None) -> dict[str, str]:
    # WANDB_SERVICE points at the W&B service of this (test) process; a child must start its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(
        {
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    if cache_dir is not None:
        env["COMM_CACHE_DIR"] = str(cache_dir)
    return env


def run_module(module: str, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600):
    """Run ``python -m module args`` as a user would (a fresh process)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_env(**extra: str) -> dict[str, str]:
    """A launcher's environment: cli_env with the GPUs hidden (processes over gloo on the CPUs)."""
    return {**cli_env(), "CUDA_VISIBLE_DEVICES": "", **extra}


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_module(module: str, args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    """Start ``python -m module args`` in the background, its stderr kept for the assertions."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    """Wait until ``text`` is in the file ``path`` (a run's log) while ``process`` still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {text!r}: {process.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def run_in_process(main, program: str, args: list[str]) -> int:
    """Call a Hydra entry point in this process with a patched argv; returns the exit status."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    old = sys.argv
    sys.argv = [program, *args]
    try:
        main()
        return 0
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        sys.argv = old
        GlobalHydra.instance().clear()


def install_wheel(tmp_path: Path) -> tuple[Path, list[str]]:
    """Build comm's wheel from this checkout and install it (no dependencies) into a directory
    of its own, as ``pip install .`` would ship it: (that directory, the wheel's file names)."""
    import zipfile

    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheel_dir.glob("comm_cli-*.whl"))
    install = subprocess.run(
        [*pip, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    return target, zipfile.ZipFile(wheel).namelist()


def run_train(args: list[str]) -> int:
    """``comm-train`` with these command-line arguments, in this process; its exit status."""
    from comm_cli.train import main as train_main

    return run_in_process(train_main, "comm-train", args)


def trainable_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def wandb_records(run_file: Path) -> list:
    """Parse a W&B offline ``.wandb`` file (a LevelDB-format log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, header = 32768, 7
    pos, chunks, records = 7, b"", []
    while pos + header <= len(data):
        left_in_block = block - pos % block
        if left_in_block < header:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if pos + header + length > len(data):  # a record still being written
            break
        payload = data[pos + header : pos + header + length]
        pos += header + length
        if kind == 0 and length == 0:
            continue
        chunks += payload
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def finished_wandb_records(run_file: Path, timeout_s: float = 60.0) -> list:
    """The records of a run file once its ``exit`` record is on disk.

    ``wandb.finish()`` returns when the service has handled the exit, but the service closes
    (and flushes) the file a moment later; on a loaded machine a read right after the run can
    see a file without its last records (the final history row is written at exit).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(run_dir: Path) -> tuple[list[dict], dict, str]:
    """(history rows, config, run id) of the single W&B offline run under ``run_dir/wandb``."""
    files = sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no W&B offline run under {run_dir}/wandb"
    rows, config, run_id = [], {}, None
    for path in files:
        for record in finished_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
            elif kind == "config":
                for item in record.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                run_id = record.run.run_id
    return rows, config, run_id


def build_composition(ws: dict[str, Path], path: Path) -> Path:
    """A saved composition of the workspace's anchor and augment with random, non-zero bridges
    (so that bridges on and off give different numbers), without training."""
    from transformers import AutoModelForCausalLM

    from comm_cli.compose import BridgeConfig, ComposedModel, MappingSpec

    torch.manual_seed(0)
    anchor = AutoModelForCausalLM.from_pretrained(ws["anchor"], dtype=torch.float32)
    augment = AutoModelForCausalLM.from_pretrained(ws["augment"], dtype=torch.float32)
    bridge = BridgeConfig(num_heads=4, zero_init_output=False)
    ComposedModel.from_models(anchor, augment, MappingSpec(every=2), bridge).save_pretrained(path)
    return path
