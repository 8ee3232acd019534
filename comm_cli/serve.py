"""`comm-serve`: a saved composition (or a baseline) behind the OpenAI HTTP API
(``comm-serve --help``). The server itself lives in ``comm_cli.serving``; this is the Hydra entry
point: check the settings, take the port, load the model, serve until Ctrl-C.

    comm-serve checkpoint=outputs/run/composition port=8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "run", "prompt": "1+2=", "max_tokens": 8}'
"""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

from omegaconf import DictConfig

from comm_cli.cli import command, register_configs, typed_config
from comm_cli.errors import CommError, ConfigError
from comm_cli.schema import USE_RULES, ServeConfig, check_values

PROGRAM = "comm-serve"
EXTRA_MISSING = (
    "comm-serve needs its web stack, which is not installed: pip install 'comm-cli[serve]' "
    "(Starlette and uvicorn)"
)
# Seconds that open streams get to finish once the server is told to stop.
GRACE_SECONDS = 5

logger = logging.getLogger(PROGRAM)

register_configs()

SERVE_RULES = USE_RULES + (
    ("port", lambda v: isinstance(v, int) and 0 <= v <= 65535, "a TCP port (0: any free one)"),
    ("max_batch_size", lambda v: isinstance(v, int) and v >= 1, "a positive number of rows"),
    ("batch_wait_ms", lambda v: isinstance(v, (int, float)) and v >= 0, "0 or more milliseconds"),
    ("max_queue", lambda v: isinstance(v, int) and v >= 1, "a positive number of waiting requests"),
)


def served_name(cfg: ServeConfig) -> str:
    """The model id clients send: ``served_model_name``, else the run a checkpoint belongs to
    (``outputs/run/composition`` -> ``run``), else the base model's directory or hub name."""
    from comm_cli.evaluation.from_run import FINAL_DIRS

    if cfg.served_model_name:
        return cfg.served_model_name
    source = (
        cfg.checkpoint if cfg.model not in ("anchor", "augment") else getattr(cfg, cfg.model).name_or_path
    )
    path = Path(str(source or cfg.model).rstrip("/"))
    return path.parent.name if path.name in FINAL_DIRS and path.parent.name else path.name


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads: a port in use is one line at once."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({err.strerror or err}): choose another port=... "
            "(port=0 takes any free one) or host=..."
        ) from err
    sock.setblocking(False)
    return sock


def build_server(cfg: ServeConfig, sock: socket.socket):
    """The uvicorn server for ``cfg`` on ``sock``, its model loaded (``server.run(sockets=[sock])``
    serves; tests run it on a thread)."""
    import uvicorn

    from comm_cli.inference.session import load_session
    from comm_cli.serving.app import ServedModel, build_app
    from comm_cli.serving.scheduler import Scheduler

    session = load_session(cfg)
    scheduler = Scheduler(cfg.max_batch_size, cfg.batch_wait_ms, cfg.max_queue, cfg.batching)
    served = ServedModel(session, served_name(cfg), cfg.generation, scheduler)
    config = uvicorn.Config(
        build_app(served),
        log_config=None,
        access_log=cfg.verbose,
        timeout_graceful_shutdown=GRACE_SECONDS,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.served = served
    return server


def run(cfg: DictConfig) -> None:
    from comm_cli.logs import setup_logging

    typed = typed_config(cfg, lambda c: check_values(c, SERVE_RULES))
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise CommError(EXTRA_MISSING) from err
    setup_logging(main_process=True)
    logging.getLogger("uvicorn.error").setLevel(logging.INFO if typed.verbose else logging.WARNING)
    sock = listen(typed.host, typed.port)
    server = build_server(typed, sock)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    batching = f"batches of up to {typed.max_batch_size}" if typed.batching else "one request at a time"
    logger.info(
        "serving %s at http://%s:%d/v1 (%s, %d may wait); Ctrl-C stops",
        server.served.name,
        where,
        port,
        batching,
        typed.max_queue,
    )
    # uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again: end quietly
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        logger.info("stopped")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


main = command(PROGRAM, "serve", run, lambda: ServeConfig, run_directory=False)

if __name__ == "__main__":
    main()
