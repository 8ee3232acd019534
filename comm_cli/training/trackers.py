"""Experiment trackers through Accelerate (W&B, TensorBoard) or none.

W&B never prompts for a login: with ``logger.mode=auto`` it runs online only when credentials are
found (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai) and otherwise writes offline files in
the run directory, saying where. A resumed run passes the stored run id, so W&B continues the
same run.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from comm_cli.errors import ConfigError

logger = logging.getLogger(__name__)

TRACKERS = ("wandb", "tensorboard", "none")


def wandb_credentials_found() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(configured: str) -> str:
    """The W&B mode to use: WANDB_MODE wins, then the config; auto means online only with credentials."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if configured == "auto":
        return "online" if wandb_credentials_found() else "offline"
    if configured not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode '{configured}' is not one of auto, online, offline, disabled")
    return configured


def new_wandb_run_id() -> str:
    """An id in W&B's format (8 lowercase letters/digits), chosen here so it can be stored in the
    run's checkpoints before W&B starts."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def log_with(logger_cfg) -> str | None:
    """The value for ``Accelerator(log_with=...)``."""
    if logger_cfg.name not in TRACKERS:
        raise ConfigError(f"logger.name '{logger_cfg.name}' is not one of {list(TRACKERS)}")
    return None if logger_cfg.name == "none" else logger_cfg.name


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> flat {"a.b": scalar} (TensorBoard's hparams take only scalars and strings)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def start_trackers(
    accelerator, logger_cfg, run_dir: Path, config: dict, run_id: str | None, default_name: str
):
    """Initialise the configured tracker on the main process. Returns the W&B run id (or None)."""
    if logger_cfg.name == "none":
        return None
    init_kwargs = {}
    if logger_cfg.name == "wandb":
        mode = wandb_mode(logger_cfg.mode)
        run_id = run_id or new_wandb_run_id()
        init_kwargs["wandb"] = {
            "mode": mode,
            "id": run_id,
            "resume": "allow",
            "dir": str(run_dir),
            "name": logger_cfg.run_name or default_name,
            "entity": logger_cfg.entity,
            "tags": list(logger_cfg.tags or []),
        }
        if accelerator.is_main_process and mode == "offline":
            logger.info(
                "W&B: no credentials found (or offline mode): logging offline to %s/wandb; upload later with "
                "`wandb sync %s/wandb/offline-run-*`",
                run_dir,
                run_dir,
            )
        tracker_config = config
    else:
        tracker_config = flat_config(config)
    accelerator.init_trackers(logger_cfg.project, config=tracker_config, init_kwargs=init_kwargs)
    return run_id
