"""The GPU suite: every measurement only a GPU can give, in one run of at most 8 minutes that writes
one JSON (gpu_suite.json) and one log (gpu_suite.log) into the directory it is given. docs/gpu.md
says how to run it on a lent GPU and what each number means.

    make gpu-suite OUT=gpu_out                       # = bash scripts/gpu_suite.sh --out gpu_out
    make gpu-suite OUT=gpu_out DRY=1                 # tiny shapes on this CPU, every case end to end
    python scripts/gpu_suite.py --out gpu_out --cases decoding,throughput --budget throughput=200

Before the cases it installs the wheels of --wheels (scripts/fetch_gpu_wheels.sh put them there)
with pip --no-index --find-links, and puts the real-facts anchor's GGUF together from the parts
carried to the machine (--stage-anchor keeps the first part on the machine between two calls).

The cases run in this order, each in a process of its own under its own time budget (GPU
seconds; --budget NAME=SECONDS overrides one). A case still running at its budget is stopped
and recorded as "timeout"; one that would start with less than its minimum left of the suite's
--total-budget is recorded as "skipped" with the reason; a case that cannot run here says why.

  correctness        scripts/gpu_check.py: the composition's guarantees on CUDA in float32 and with
                     bf16 bases + fp32 bridges, Accelerate's bf16 mixed precision, the anchor-prefix
                     cache (replayed and through comm-train), cached == uncached generation
  decoding           bench.py --decoding at the 1b preset, batch 1 and 16: composed per token
                     against the anchor's + the augment's own (target <= 1.10)
  decoding_compiled  the same with comm's compiled / CUDA-graph decoding step, "not available"
                     while comm has none
  throughput         bench.py --throughput at the 1b preset (~1.5B + 0.6B, random weights), bf16,
                     prompt/completion rows at 1024 and 2048 tokens: MFU (target >= 45%), step
                     against the bound, COMM_LINEAR_CE=torch|liger|cce side by side, peak memory
                     against every logit
  bench              bench.py --device cuda: the default, prompt/completion and aligned cases
  real_facts         scripts/real_facts_sweep.py: one short CALM setting on SmolLM2-135M-Instruct
                     (held-out one hop / two hops), per specialist seed while time is left

This file imports nothing beyond the standard library, so a broken install is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
ANCHOR_PARTS = REPO / ".gpu_anchor"  # --split-anchor writes the GGUF's parts to 1/, 2/, ...
STAGE = Path(tempfile.gettempdir()) / "comm-gpu-anchor"  # the parts between calls on one machine
MANIFEST = "anchor.json"  # beside every part: the file's name, size, sha256 and parts in order
# the packages that travel as wheels (scripts/fetch_gpu_wheels.sh); the suite checks each imports
MODULES = ("hydra", "omegaconf", "datasets", "gguf", "liger_kernel", "cut_cross_entropy", "wandb")
# bench.py's tiny shapes for the dry mode (as tests/test_bench.py)
TINY = [
    *"--anchor-width 64 --anchor-layers 4 --augment-width 32 --augment-layers 4 --every 2".split(),
    *"--vocab 300 --batch 2 --seq 16 --prompt 4 --new-tokens 2 --threads 1 --repeats 1 --warmup 0".split(),
]
DRY_BUDGET = 900.0  # seconds a case may take in the dry mode (a loaded 2-core CPU)


@dataclass(frozen=True)
class Case:
    name: str
    budget: float  # seconds it may take on a GPU
    minimum: float  # start it only with this much of the suite's budget left
    expected: float  # what it should take on an H100/H200 (docs/gpu.md says why)


CASES = (
    Case("correctness", budget=150, minimum=60, expected=80),
    Case("decoding", budget=90, minimum=40, expected=40),
    Case("decoding_compiled", budget=120, minimum=10, expected=5),
    Case("throughput", budget=150, minimum=60, expected=75),
    Case("bench", budget=100, minimum=40, expected=55),
    Case("real_facts", budget=240, minimum=120, expected=180),
)


# ------------------------------------------------------------------ the record
class Record:
    """gpu_suite.json, rewritten after every step, so a suite stopped from outside still leaves
    what it measured; and gpu_suite.log, the driver's lines and every case's output."""

    def __init__(self, out: Path, data: dict):
        self.out = out
        self.data = data
        self.log_path = out / "gpu_suite.log"
        self.log_path.write_text("")

    def say(self, line: str) -> None:
        line = f"[gpu-suite {time.strftime('%H:%M:%S')}] {line}"
        print(line, flush=True)
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def save(self) -> None:
        tmp = self.out / ".gpu_suite.json.partial"
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.out / "gpu_suite.json")


def run_logged(record: Record, title: str, command: list[str], env: dict, timeout: float) -> dict:
    """Run ``command`` in a process group of its own, its output appended to the log; stopped
    (the whole group) at ``timeout`` seconds. Returns its exit code (None: stopped), seconds and
    the last lines it printed."""
    with open(record.log_path, "a") as handle:
        handle.write(f"\n===== {title}: {' '.join(command)}\n")
        handle.flush()
        offset = handle.tell()
        start = time.monotonic()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    with open(record.log_path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read()[-4000:].decode("utf-8", "replace").strip().splitlines()[-8:]
    return {"code": code, "seconds": round(time.monotonic() - start, 1), "tail": tail}


# ------------------------------------------------------------------ before the cases
def environment(python: str, env: dict) -> dict:
    """What the cases will run on: versions, the device, and which travelling packages import."""
    probe = f"""
import importlib, importlib.metadata as metadata, json, platform, sys
out = {{"python": sys.version.split()[0], "versions": {{}}, "modules": {{}}}}
for name in ("torch", "transformers", "accelerate", "peft", "triton", "pyarrow", "fsspec", "huggingface-hub"):
    try:
        out["versions"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out["versions"][name] = None
for name in {MODULES!r}:
    try:
        module = importlib.import_module(name)
        out["modules"][name] = getattr(module, "__version__", "installed")
    except Exception as error:
        out["modules"][name] = "missing: " + repr(error)[:200]
try:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["device"] = torch.cuda.get_device_name() if out["cuda"] else platform.machine()
except Exception as error:
    out["cuda"], out["device"] = False, "torch not importable: " + repr(error)[:200]
print(json.dumps(out))
"""
    result = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:], "cuda": False, "modules": {}}
    return json.loads(result.stdout.strip().splitlines()[-1])


def install_wheels(record: Record, args, env: dict) -> dict:
    """pip install --no-index --find-links WHEELS: first resolving against what the machine has
    (pip then picks, e.g., the datasets that its pyarrow allows), else the pinned list without
    dependencies."""
    wheels = Path(args.wheels)
    if args.dry:
        return {"status": "skipped", "reason": "dry mode: nothing is installed on this machine"}
    if not (wheels / "requirements.txt").is_file():
        return {
            "status": "skipped",
            "reason": f"no wheels in {wheels}: run scripts/fetch_gpu_wheels.sh where PyPI is reachable "
            "and carry .whl to the GPU machine (docs/gpu.md)",
        }
    pip = [args.python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    pip += ["--no-cache-dir", "--no-compile", "--disable-pip-version-check"]
    first = run_logged(record, "install", [*pip, "-r", str(wheels / "requirements.txt")], env, 180)
    if first["code"] == 0:
        return {"status": "ok", "how": "resolved against the installed packages", "seconds": first["seconds"]}
    second = run_logged(
        record, "install --no-deps", [*pip, "--no-deps", "-r", str(wheels / "pinned.txt")], env, 180
    )
    return {
        "status": "ok" if second["code"] == 0 else "failed",
        "how": "pinned, without dependencies (resolving failed: see the log)",
        "resolve_error": first["tail"][-3:],
        "seconds": first["seconds"] + second["seconds"],
        **({"error": second["tail"][-3:]} if second["code"] != 0 else {}),
    }


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def split_anchor(gguf: Path, part_bytes: int, parts_dir: Path) -> dict:
    """Write ``gguf`` as parts of at most ``part_bytes`` to PARTS_DIR/1, PARTS_DIR/2, ..., each
    with the manifest (one call to the GPU machine carries at most 64 MiB)."""
    size = gguf.stat().st_size
    count = -(-size // part_bytes)
    manifest = {
        "file": gguf.name,
        "size": size,
        "sha256": sha256(gguf),
        "parts": [f"{gguf.name}.part{i}" for i in range(1, count + 1)],
    }
    shutil.rmtree(parts_dir, ignore_errors=True)
    with open(gguf, "rb") as source:
        for index, name in enumerate(manifest["parts"], start=1):
            directory = parts_dir / str(index)
            directory.mkdir(parents=True)
            (directory / name).write_bytes(source.read(part_bytes))
            (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def part_dirs(args) -> list[Path]:
    """Where parts may be: each carried part's folder, then the stage of an earlier call."""
    carried = sorted(p for p in Path(args.anchor_parts).glob("*") if p.is_dir())
    return [*carried, Path(args.stage_dir)]


def stage_anchor(args) -> dict:
    """Copy the anchor parts carried in this call to the stage, where the next call on the same
    machine finds them (the machine stays warm for a short while between calls)."""
    stage = Path(args.stage_dir)
    stage.mkdir(parents=True, exist_ok=True)
    copied = []
    for directory in part_dirs(args)[:-1]:
        for path in directory.iterdir():
            shutil.copy2(path, stage / path.name)
            copied.append(path.name)
    return {"staged": sorted(copied), "in": str(stage), "now_there": sorted(p.name for p in stage.iterdir())}


def find_anchor(args) -> dict:
    """The real-facts anchor's GGUF: --gguf-dir, or the carried parts joined (and checked against
    the manifest's size and sha256) in the stage."""
    if args.gguf_dir:
        path = Path(args.gguf_dir) / args.gguf_file
        if not path.is_file():
            return {"status": "missing", "reason": f"--gguf-dir has no {args.gguf_file}"}
        return {"status": "ok", "gguf_dir": str(Path(args.gguf_dir).resolve()), "gguf_file": args.gguf_file}
    places = part_dirs(args)
    manifests = [d / MANIFEST for d in places if (d / MANIFEST).is_file()]
    if not manifests:
        return {
            "status": "missing",
            "reason": "no anchor parts carried (.gpu_anchor/1 and .gpu_anchor/2 from scripts/fetch_gpu_wheels.sh; "
            "the GGUF is larger than one call's 64 MiB, so it travels in two calls: docs/gpu.md)",
        }
    manifest = json.loads(manifests[0].read_text())
    stage = Path(args.stage_dir)
    target = stage / manifest["file"]
    if not (target.is_file() and target.stat().st_size == manifest["size"]):
        found = {p: next((d / p for d in places if (d / p).is_file()), None) for p in manifest["parts"]}
        absent = [p for p, where in found.items() if where is None]
        if absent:
            return {
                "status": "missing",
                "reason": f"anchor part(s) {', '.join(absent)} not on this machine: carry .gpu_anchor/1 in a call "
                "that runs `bash scripts/gpu_suite.sh --stage-anchor` just before this one (docs/gpu.md)",
            }
        stage.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".joining")
        with open(partial, "wb") as joined:
            for part in manifest["parts"]:
                with open(found[part], "rb") as handle:
                    shutil.copyfileobj(handle, joined, 1 << 22)
        partial.replace(target)
    if sha256(target) != manifest["sha256"]:
        target.unlink()
        return {
            "status": "missing",
            "reason": "the joined anchor's sha256 is not its manifest's: parts of two downloads?",
        }
    return {
        "status": "ok",
        "gguf_dir": str(stage),
        "gguf_file": manifest["file"],
        "sha256": manifest["sha256"],
    }


# ------------------------------------------------------------------ the cases
def case_command(case: Case, args, result: Path, anchor: dict) -> list[str] | dict:
    """The command that runs ``case`` and writes its JSON to ``result``, or why it cannot run."""
    py, bench = args.python, str(SCRIPTS / "bench.py")
    gpu = ["--device", "cpu"] if args.dry else ["--device", "cuda"]
    if case.name == "correctness":
        return [
            py,
            str(SCRIPTS / "gpu_check.py"),
            "--out",
            str(result),
            *(["--device", "cpu", "--dry"] if args.dry else []),
        ]
    if case.name in ("decoding", "decoding_compiled"):
        shape = [*TINY, "--decode-batches", "1,2", "--new-tokens", "3"] if args.dry else [
            "--preset", "1b", "--decode-batches", "1,16", "--new-tokens", "64", "--warmup", "1", "--repeats", "3"]  # fmt: skip
        compiled = ["--compiled"] if case.name == "decoding_compiled" else []
        return [py, bench, "--decoding", *gpu, *shape, *compiled, "--out", str(result)]
    if case.name == "throughput":
        shape = [*TINY, "--no-memory", "--throughput-seqs", "16,32", "--throughput-tokens", "64"] if args.dry else [
            "--preset", "1b", "--throughput-seqs", args.throughput_seqs, "--throughput-tokens", "8192",
            "--warmup", "2", "--repeats", "5"]  # fmt: skip
        return [py, bench, "--throughput", *gpu, *shape, "--out", str(result)]
    if case.name == "bench":
        shape = [*TINY, "--no-memory", "--case-vocab", "500"] if args.dry else []
        return [py, bench, *gpu, *shape, "--out", str(result)]
    if case.name == "real_facts":
        if args.dry and not args.gguf_dir:
            return {
                "status": "skipped",
                "reason": "dry mode runs it only on a small GGUF given with --gguf-dir",
            }
        if anchor["status"] != "ok":
            return {"status": "skipped", "reason": anchor["reason"]}
        command = [
            py, str(SCRIPTS / "real_facts_sweep.py"), "--gguf-dir", anchor["gguf_dir"], "--gguf-file",
            anchor["gguf_file"], "--work", str(args.scratch / "real_facts_work"), "--out", str(result.parent / "real_facts"),
            "--only", args.real_facts_setting, "--specialist-seeds", args.real_facts_seeds,
        ]  # fmt: skip
        if args.real_facts_pairs:
            command += ["--pairs", args.real_facts_pairs]
        if args.dry:
            command += ["--device", "cpu", "--scale", "0.01", "--max-eval", "4", "--no-filter-cities"]
        else:  # as the H200 learning-rate table of docs/experiments/real_facts.md (bfloat16 bases)
            command += ["--device", "cuda", "--dtype", "bfloat16"]
        return command
    raise ValueError(case.name)


def real_facts_result(directory: Path) -> dict:
    """The sweep's results.jsonl, summarised: each finished setting's held-out scores."""
    path = directory / "results.jsonl"
    events = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            events.append(json.loads(line))
        except ValueError:  # the line being written when the case was stopped
            pass
    finals = [
        {k: e.get(k) for k in ("name", "one_hop_heldout", "two_hop_heldout", "skill_off_tf", "seconds")}
        for e in events
        if e["event"] == "final"
    ]
    errors = [e for e in events if e["event"] == "error"]
    out = {"finals": finals, "events": events}
    if not finals:
        out["status"] = "failed"
        out["reason"] = errors[0]["trace"].strip().splitlines()[-1] if errors else "no setting finished"
    return out


def run_case(record: Record, case: Case, args, env: dict, anchor: dict, left: float) -> dict:
    budget = args.budgets.get(case.name, DRY_BUDGET if args.dry else case.budget)
    minimum = 0.0 if args.dry else case.minimum
    if left < minimum:
        return {
            "status": "skipped",
            "reason": f"only {left:.0f} s of the suite's {args.total_budget:.0f} s left; it needs {minimum:.0f} s",
        }
    result_path = args.scratch / f"{case.name}.json"
    result_path.unlink(missing_ok=True)
    command = case_command(case, args, result_path, anchor)
    if isinstance(command, dict):
        return command
    if case.name == "real_facts":
        shutil.rmtree(result_path.parent / "real_facts", ignore_errors=True)
        # the sweep starts no further specialist seed once a setting could no longer finish
        command += ["--budget", str(max(0.0, min(budget, left) - (args.real_facts_setting_s or 0)))]
    timeout = min(budget, left)
    ran = run_logged(record, case.name, command, env, timeout)
    entry = {
        "seconds": ran["seconds"],
        "budget_s": budget,
        "timeout_s": round(timeout, 1),
        "expected_on_gpu_s": case.expected,
    }
    payload = {}
    if case.name == "real_facts":
        payload = real_facts_result(result_path.parent / "real_facts")
    elif result_path.is_file():
        try:
            payload = json.loads(result_path.read_text())
        except ValueError:
            payload = {"status": "failed", "reason": f"its result {result_path.name} is not JSON"}
    elif ran["code"] == 0:
        payload = {"status": "failed", "reason": "it wrote no result (see the log)"}
    if ran["code"] is None:
        entry.update(status="timeout", reason=f"stopped after {timeout:.0f} s (its budget or the suite's)")
    elif ran["code"] != 0:
        entry.update(status="failed", reason=(ran["tail"] or ["no output"])[-1], tail=ran["tail"])
    else:
        entry["status"] = payload.pop("status", "ok")
        if "reason" in payload:
            entry["reason"] = payload.pop("reason")
    if payload:
        entry["result"] = payload
    return entry


# ------------------------------------------------------------------ the headline numbers
def headline(cases: dict) -> dict:
    """The numbers the issue asks for, each with its target, from the cases that ran."""
    out: dict = {}
    correctness = cases.get("correctness", {}).get("result")
    if correctness:
        out["correctness_passed"] = {"value": correctness["passed"], "failures": correctness["failures"]}
    for name, key in (
        ("decoding", "composed_over_anchor_plus_augment"),
        ("decoding_compiled", "compiled_over_anchor_plus_augment"),
    ):
        for batch, row in (cases.get(name, {}).get("result") or {}).get("batches", {}).items():
            value = row.get(key)
            out[f"{name}_batch{batch}"] = {
                "value": value,
                "target": "<= 1.10",
                "met": value is not None and value <= 1.10,
            }
    throughput = cases.get("throughput", {}).get("result")
    for length in (throughput or {}).get("lengths", []):
        for backend, row in length["backends"].items():
            label = f"throughput_seq{length['seq']}_{backend}"
            if row.get("status") != "ok":
                out[label] = f"{row['status']}: {row.get('reason', '')}"
                continue
            mfu = row["mfu"]
            out[f"{label}_mfu"] = {"value": mfu, "target": ">= 0.45", "met": mfu is not None and mfu >= 0.45}
            out[f"{label}_over_bound"] = {"value": row["step_over_lower_bound"], "target": "<= 1.10"}
        out[f"throughput_seq{length['seq']}_measured_order"] = {
            "value": length["measured_order"],
            "auto_selects_now": length["auto_selects"],
        }
    bench = cases.get("bench", {}).get("result")
    if bench:
        for key, target in (
            ("calm_step_over_lower_bound", "<= 1.10"),
            ("generation_over_anchor_plus_augment", "<= 1.15"),
            ("calm_step_over_full_logits_bound", "<= 0.90"),
            ("peak_memory_over_full_logits", "<= 0.70"),
        ):
            out[f"bench_{key}"] = {"value": bench.get(key), "target": target}
    for final in (cases.get("real_facts", {}).get("result") or {}).get("finals", []):
        out[f"real_facts_{final['name']}"] = {
            "one_hop_heldout": final["one_hop_heldout"],
            "two_hop_heldout": final["two_hop_heldout"],
        }
    return out


# ------------------------------------------------------------------ the run
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="the directory for gpu_suite.json and gpu_suite.log")
    parser.add_argument("--dry", action="store_true", default=os.environ.get("DRY", "") not in ("", "0"),
                        help="tiny shapes on the CPU, every case end to end (also DRY=1)")  # fmt: skip
    parser.add_argument("--cases", default=",".join(c.name for c in CASES), help="which cases, in this order")
    parser.add_argument("--total-budget", type=float, default=None, help="seconds (default: 480; dry: 3600)")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="CASE=SECONDS", help="one case's budget"
    )
    parser.add_argument(
        "--wheels", default=str(REPO / ".whl"), help="scripts/fetch_gpu_wheels.sh's directory"
    )
    parser.add_argument("--python", default=sys.executable, help="the Python the cases run under")
    parser.add_argument("--scratch", default=None, help="work files (default: a fresh temporary directory)")
    parser.add_argument("--gguf-dir", default=None, help="a folder holding the real-facts anchor's GGUF")
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--real-facts-setting", default=None,
                        help="a scripts/real_facts_sweep.py setting (default W3_top_600_lr3e-3; dry W1_top_150)")  # fmt: skip
    parser.add_argument("--real-facts-seeds", default="1,2", help="specialist seeds, run while time is left")
    parser.add_argument("--real-facts-setting-s", type=float, default=None,
                        help="seconds one seed of the setting takes (no seed starts with less left; default: 75, dry 0)")  # fmt: skip
    parser.add_argument(
        "--real-facts-pairs", default=None, help='override the setting\'s connections, e.g. "[[3,4]]"'
    )
    parser.add_argument("--throughput-seqs", default="1024,2048")
    parser.add_argument("--anchor-parts", default=str(ANCHOR_PARTS), help="the carried anchor parts' folder")
    parser.add_argument(
        "--stage-dir", default=str(STAGE), help="where parts wait between calls and are joined"
    )
    parser.add_argument(
        "--stage-anchor", action="store_true", help="only copy the carried anchor parts to the stage"
    )
    parser.add_argument("--split-anchor", metavar="GGUF", help="only write GGUF's parts to --anchor-parts")
    parser.add_argument("--part-bytes", type=int, default=56 * 2**20, help="with --split-anchor")
    args = parser.parse_args(argv)
    if args.stage_anchor or args.split_anchor:
        return args
    if not args.out:
        parser.error("--out DIR is required (make gpu-suite OUT=DIR)")
    args.budgets = {}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in {c.name for c in CASES} or not seconds:
            parser.error(f"--budget {item}: expected CASE=SECONDS with CASE one of {[c.name for c in CASES]}")
        args.budgets[name] = float(seconds)
    unknown = set(filter(None, args.cases.split(","))) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}: choose from {[c.name for c in CASES]}")
    if args.total_budget is None:
        args.total_budget = 3600.0 if args.dry else 480.0
    if args.real_facts_setting_s is None:
        args.real_facts_setting_s = 0.0 if args.dry else 75.0
    if args.dry:  # a small world and a small test GGUF: the specialist's layer 3 into anchor layer 4
        args.real_facts_setting = args.real_facts_setting or "W1_top_150"
        args.real_facts_pairs = args.real_facts_pairs or "[[3,4]]"
    args.real_facts_setting = args.real_facts_setting or "W3_top_600_lr3e-3"
    return args


def case_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", COMM_CACHE_DIR=str(args.scratch / "cache"),
    )  # fmt: skip
    env.pop("COMM_LINEAR_CE", None)  # the throughput case sets it per backend
    if args.dry:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage_anchor:
        print(json.dumps(stage_anchor(args), indent=2))
        return 0
    if args.split_anchor:
        print(
            json.dumps(
                split_anchor(Path(args.split_anchor), args.part_bytes, Path(args.anchor_parts)), indent=2
            )
        )
        return 0
    start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    own_scratch = args.scratch is None
    args.scratch = Path(args.scratch or tempfile.mkdtemp(prefix="comm-gpu-suite-")).resolve()
    args.scratch.mkdir(parents=True, exist_ok=True)
    env = case_env(args)
    record = Record(out, {})
    record.data["suite"] = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry": args.dry,
        "total_budget_s": args.total_budget,
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "commit": git_commit(),
    }
    record.say(
        f"{'dry run on the CPU' if args.dry else 'GPU run'}: budget {args.total_budget:.0f} s, out {out}"
    )
    record.data["install"] = install_wheels(record, args, env)
    record.say(f"install: {record.data['install']['status']} {record.data['install'].get('reason', '')}")
    record.data["environment"] = environment(args.python, env)
    record.data["anchor"] = find_anchor(args)
    record.data["cases"] = {}
    record.save()
    for case in (c for name in args.cases.split(",") for c in CASES if c.name == name):
        left = args.total_budget - (time.monotonic() - start)
        if not args.dry and not record.data["environment"].get("cuda"):
            entry = {"status": "skipped", "reason": "no CUDA device here (run with --dry on a CPU)"}
        else:
            record.say(f"{case.name}: starting ({left:.0f} s of the suite's budget left)")
            entry = run_case(record, case, args, env, record.data["anchor"], left)
        record.data["cases"][case.name] = entry
        record.say(f"{case.name}: {entry['status']} {entry.get('reason', '')} ({entry.get('seconds', 0)} s)")
        record.save()
    record.data["not_run"] = {
        name: f"{entry['status']}: {entry.get('reason', '')}"
        for name, entry in record.data["cases"].items()
        if entry["status"] not in ("ok",)
    }
    record.data["headline"] = headline(record.data["cases"])
    record.data["suite"]["seconds"] = round(time.monotonic() - start, 1)
    record.save()
    record.say(f"done in {record.data['suite']['seconds']:.0f} s: {out / 'gpu_suite.json'}")
    if own_scratch:
        shutil.rmtree(args.scratch, ignore_errors=True)
    return 0


def git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
