"""`omnivox serve --workers N`: N front processes on one port, for engines that run elsewhere.

One server process runs its doors, session cores and VAD on one event loop, so it uses about one core. With a
remote engine the front holds no model and nothing shared between calls, so N processes (uvicorn's supervisor, one
listening socket, the kernel spreading new connections) serve N cores. An in-process engine would be loaded once
per worker, so it is refused. Each worker has its own `server.max_sessions`. Metrics are written per worker into a
shared directory and every worker's `/metrics` shows the sum (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from typing import Any

from starlette.applications import Starlette

from omnivox.server.cli import LOG_FORMAT
from omnivox.server.config import Config

CONFIG_VARIABLE = "OMNIVOX_WORKER_CONFIG"
"""The validated configuration, as JSON, handed from the supervisor to the workers it spawns."""
METRICS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class WorkersRefused(Exception):
    """Several workers were asked for an engine that lives in the server process."""


def check_workers(config: Config, workers: int) -> None:
    if workers < 1:
        raise WorkersRefused("--workers must be at least 1")
    if workers > 1 and config.engine.name != "remote":
        raise WorkersRefused(
            f"--workers {workers} needs engine.name remote: the {config.engine.name} engine runs in the server "
            "process and would be loaded once per worker. Run one process, or serve the model from an engine host "
            "(`omnivox serve --engine qwen2.5-omni` on the GPU machine) and point fronts at it with --engine remote"
        )


def serve_workers(config: Config, workers: int, uvicorn_options: dict[str, Any]) -> None:
    """Run `workers` processes until interrupted (the supervisor restarts any that dies)."""
    import uvicorn

    metrics_dir = tempfile.mkdtemp(prefix="omnivox-metrics-")
    os.environ[METRICS_VARIABLE] = metrics_dir
    os.environ[CONFIG_VARIABLE] = config.model_dump_json()
    try:
        uvicorn.run("omnivox.server.workers:worker_app", factory=True, workers=workers, **uvicorn_options)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def worker_app() -> Starlette:
    """The app of one worker process (uvicorn calls this in each spawned worker)."""
    from prometheus_client import multiprocess

    from omnivox.server.app import create_app

    config = Config.model_validate_json(os.environ[CONFIG_VARIABLE])
    logging.basicConfig(level=config.server.log_level.upper(), format=LOG_FORMAT)
    pid = os.getpid()
    atexit.register(multiprocess.mark_process_dead, pid)  # its live gauges (sessions open) stop counting
    logging.getLogger(__name__).info("worker %d serving", pid)
    return create_app(config)
