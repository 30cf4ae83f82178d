"""The metrics log of a training run: one JSON object per line of `<run_dir>/metrics.jsonl`.

Each record is `{"step": n, ...metrics}`; TensorBoard gets the numeric ones too when
`tensorboardX` is installed. A resumed run first drops the records after the step it
resumes from (an interrupted run logged them, its checkpoint does not hold them, and
the resumed run logs them again), so no step appears twice.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl (and TensorBoard if present)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        """Opens `run_dir/metrics.jsonl`, first dropping records after `start_step` (those
        of an interrupted run's steps that its checkpoint does not hold, and that a
        resumed run logs again), so no step appears twice."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a")
        self._tb = _tensorboard(run_dir)

    def write(self, step: int, record: dict) -> None:
        self._file.write(json.dumps({"step": step, **record}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0  # a torn last line of a killed run sorts first; kept as written


class NullLog:
    """The metrics log of processes other than 0: writes nothing."""

    def write(self, step: int, record: dict) -> None:
        del step, record

    def close(self) -> None:
        pass


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter  # optional
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))
