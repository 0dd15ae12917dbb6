"""Where a run's metrics go besides metrics.jsonl: ``train.loggers: [jsonl, tensorboard, wandb]``.

``metrics.jsonl`` is always written: it is the source of truth that ``--resume``, ``sleepzoo compare`` and
``sleepzoo report`` read, so ``jsonl`` is implied and may be left out of the list (``[tensorboard]`` logs to
both). The other two are optional packages, checked when training starts (:func:`check_available`):

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``RUN_DIR/tensorboard/``
  (``pip install -e '.[tensorboard]'``). A resumed run purges the events after its checkpoint's step
  (``purge_step``), so steps that are trained again are not shown twice.
* ``wandb``: Weights & Biases, files under ``RUN_DIR/wandb/`` (``pip install -e '.[wandb]'``). Project:
  ``train.wandb_project``, else ``$WANDB_PROJECT``, else ``sleepzoo``; run name: ``$WANDB_NAME``, else the
  run directory's name; the recipe is the run's config. The run id is kept in ``RUN_DIR/wandb/run_id``, and
  ``--resume`` continues that run. ``$WANDB_MODE`` is obeyed when set; otherwise a machine without an API
  key (``$WANDB_API_KEY`` or ``wandb login``) or without a connection to the server logs offline
  (``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later).

Every record metrics.jsonl gets is logged at its ``step``: train lines as ``train/<key>``, evaluation lines as
``<split>/<key>`` (``test/exact_accuracy``); lists and mappings of numbers become ``key/0``, ``key/<name>``.
Only rank 0 logs. A logger that fails (a full disk, a lost connection) is switched off with one warning and
training goes on; metrics.jsonl, written before any logger is called, is never touched by one.
"""

from __future__ import annotations

import importlib
import math
import netrc
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from .config import Recipe, RecipeError

# name -> (the module it needs, the extra that installs it)
OPTIONAL = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_HOST = "https://api.wandb.ai"


def check_available(recipe: Recipe) -> None:
    """One error naming the package and the pip command for each logger of ``train.loggers`` whose package is
    not installed; called before anything is built or written."""
    for name in recipe.train.loggers:
        if name not in OPTIONAL:
            continue
        module, extra = OPTIONAL[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RecipeError(f"{recipe.source}: train.loggers: {name!r} needs the {extra} package, which is not "
                              f"installed ({exc}); pip install -e '.[{extra}]' (or pip install {extra}), or "
                              f"leave {name!r} out: metrics.jsonl is written either way") from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, keyed ``train/<key>`` or ``<split>/<key>``; lists and mappings
    of numbers are flattened (``test/label_accuracy/0``). ``step``, ``split`` and ``stage`` are not values."""
    prefix = record.get("split", "train")
    out: dict[str, float] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[key] = float(value)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                add(f"{key}/{i}", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{key}/{k}", v)

    for key, value in record.items():
        if key not in ("step", "split", "stage"):
            add(f"{prefix}/{key}", value)
    return out


class Logger(Protocol):
    """One destination: ``log`` a record's scalars at a step, ``close`` at the end."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


class TensorBoard:
    """``RUN_DIR/tensorboard/``; events of steps after ``start`` that an earlier process wrote are purged."""

    def __init__(self, recipe: Recipe, out: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what it logged, as metrics.jsonl does

    def close(self, failed: bool) -> None:
        self.writer.close()


def _wandb_mode() -> tuple[str | None, str | None]:
    """wandb's mode and why it is offline: ``$WANDB_MODE`` when set (wandb reads it itself), else offline
    without an API key or without a connection to the server, else online."""
    if os.environ.get("WANDB_MODE"):
        return None, None
    host = os.environ.get("WANDB_BASE_URL", WANDB_HOST)
    address = urlparse(host)
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(address.hostname or "") is not None
        except (OSError, netrc.NetrcParseError):
            has_key = False
    if not has_key:
        return "offline", "no API key ($WANDB_API_KEY or `wandb login`)"
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout=3).close()
    except OSError:
        return "offline", f"no connection to {host}"
    return "online", None


class WandB:
    """A Weights & Biases run under ``RUN_DIR/wandb/``, resumed by the id in ``RUN_DIR/wandb/run_id``."""

    def __init__(self, recipe: Recipe, out: Path, start: int):
        import wandb

        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else ""
        if not run_id:  # a new run, or one that starts over
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        mode, why = _wandb_mode()
        if why:
            print(f"note: wandb logs offline under {folder} ({why}); `wandb sync {folder}/offline-run-*` uploads "
                  f"it later", flush=True)
        project = recipe.train.wandb_project or os.environ.get("WANDB_PROJECT") or "sleepzoo"
        self.run = wandb.init(project=project, name=os.environ.get("WANDB_NAME") or out.resolve().name, id=run_id,
                              resume="allow", dir=str(out), config=recipe.to_dict(), mode=mode)
        self.run.define_metric("step")  # the trainer's step is the x axis: a resumed run logs steps again
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BUILDERS = {"tensorboard": TensorBoard, "wandb": WandB}


def _warn(name: str, what: str, exc: BaseException) -> None:
    print(f"warning: the {name} logger failed {what} ({type(exc).__name__}: {exc}); it is off for the rest of "
          f"this run, training goes on and metrics.jsonl is complete", file=sys.stderr, flush=True)


class Loggers:
    """The run's optional loggers (none on ranks other than 0), fed every record after metrics.jsonl."""

    def __init__(self, loggers: dict[str, Logger] | None = None):
        self.loggers = dict(loggers or {})

    @classmethod
    def open(cls, recipe: Recipe, out: Path, start: int, main: bool) -> Loggers:
        """The loggers of ``train.loggers`` for a run that trains from step ``start`` (0: a new run). A logger
        that can not start is left out with a warning."""
        opened: dict[str, Logger] = {}
        for name in recipe.train.loggers if main else ():
            if name in BUILDERS:
                try:
                    opened[name] = BUILDERS[name](recipe, out, start)
                except Exception as exc:  # noqa: BLE001 - a logger never stops training
                    _warn(name, "to start", exc)
        return cls(opened)

    def log(self, record: dict) -> None:
        """Log one metrics.jsonl record at its step; a logger that raises is closed and dropped."""
        if not self.loggers:
            return
        values = scalars(record)
        for name, logger in list(self.loggers.items()):
            try:
                logger.log(record["step"], values)
            except Exception as exc:  # noqa: BLE001 - a logger never stops training
                _warn(name, f"at step {record['step']}", exc)
                self._drop(name, failed=True, warn=False)  # one warning a logger

    def close(self, failed: bool = False) -> None:
        """Close every logger (``failed``: the run stopped on an error)."""
        for name in list(self.loggers):
            self._drop(name, failed)

    def _drop(self, name: str, failed: bool, warn: bool = True) -> None:
        logger = self.loggers.pop(name)
        try:
            logger.close(failed)
        except Exception as exc:  # noqa: BLE001 - nor does closing one
            if warn:
                _warn(name, "to close", exc)
