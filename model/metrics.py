"""A run's record: ``metrics.jsonl`` (one row a step) and, with matplotlib, ``loss.png``.

Every row has every field, so a reader never guesses: ``val_loss`` is null on steps without a
validation pass. A resumed run keeps the rows up to the step it resumes from and appends after them:
a last line cut off mid-row (a run stopped while writing it) is dropped and said; a file it cannot
read, or damage before the last line (the rows after it would be lost), is refused.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from ptxgen.files import read_file, write_atomic

METRICS, PLOT, SAMPLE = "metrics.jsonl", "loss.png", "sample.txt"
FIELDS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


class MetricsError(ValueError):
    """A metrics.jsonl a resumed run cannot continue; one line for the user."""


class MetricsLog:
    """Appends one JSON row a step to ``run_dir/metrics.jsonl``."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.path = Path(run_dir) / METRICS
        kept = []
        if start_step:  # a resumed run keeps the rows up to its checkpoint
            rows, dropped = read_for_resume(self.path)
            if dropped:
                print(f"ptxgen train: warning: {dropped}", file=sys.stderr, flush=True)
            kept = [row for row in rows if row["step"] <= start_step]
        write_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())
        self._file = self.path.open("a")

    def record(self, **row: Any) -> None:
        assert tuple(row) == FIELDS, f"a metrics row has exactly {FIELDS}"
        self._file.write(json.dumps({k: _finite_or_none(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _finite_or_none(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (none if it does not exist); a damaged line ends the read."""
    try:
        return _rows(read_file(path))[0]
    except FileNotFoundError:
        return []


def read_for_resume(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a run's metrics.jsonl (none if it does not exist) for its resumed run, and what was
    dropped: a last line cut off mid-row, as a run stopped while writing it leaves it (no line
    break after it). A file that cannot be read, or a damaged line before that, is a MetricsError."""
    try:
        data = read_file(path)
    except FileNotFoundError:
        return [], None
    except OSError as e:
        raise MetricsError(f"cannot read {path}: {e.strerror or e}") from None
    rows, damaged = _rows(data)
    if damaged is None:
        return rows, None
    if damaged == len(data.splitlines()) and not data.endswith(b"\n"):
        return rows, f"{path}: its last line ({damaged}) was cut off mid-row, as a run stopped while writing it " \
                     "leaves it; dropped"
    raise MetricsError(f"{path} is damaged at line {damaged}: not a row of metrics (only a last line cut off "
                       "mid-row is dropped); repair or remove the line, or move the file away (the record then "
                       "starts at the step the run resumes from)")


def _rows(data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """(the rows before the first damaged line, that line's number, or None)."""
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            row = json.loads(line.decode("utf-8"))  # (UnicodeDecodeError is a ValueError too)
        except ValueError:
            row = None
        if not isinstance(row, dict) or set(row) != set(FIELDS) or not isinstance(row["step"], int):
            return rows, number
        rows.append(row)
    return rows, None


def plot_losses(run_dir: Path) -> Path | None:
    """``loss.png``: train loss every step and validation loss where measured; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(Path(run_dir) / METRICS)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.7, label="train")
    val = [r for r in rows if r["val_loss"] is not None]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(out, png.getvalue())
    return out
