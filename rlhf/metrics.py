"""Metrics: one JSON object per line (plus TensorBoard when installed), and the curves as a PNG.

    with MetricsLogger("runs/ppo/metrics.jsonl") as logger:
        logger.log({"proxy_reward": 0.3, "kl": 1.2}, step=1)
    plot_curves("runs/ppo/metrics.jsonl", "runs/ppo/curves.png", samples=[...])

The PPO keys the plot knows (others are logged but not drawn): `iteration` (x axis; `step`
otherwise), `proxy_reward` (the reward model's score), `gold_reward` (the task's judge),
`kl` (to the reference, per sequence), `policy/entropy` or `entropy`, `policy/loss` or
`policy_loss`, `value/loss` or `value_loss`.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf.checkpoint import atomic_write_bytes, atomic_write_text

__all__ = ["PANELS", "MetricsLogger", "plot_curves", "read_metrics"]

# (panel title, candidate keys in order of preference); a panel is drawn when any key is there.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("proxy reward (reward model)", ("proxy_reward",)),
    ("gold reward (judge)", ("gold_reward",)),
    ("KL to reference (nats / sequence)", ("kl",)),
    ("policy entropy (nats / token)", ("policy/entropy", "entropy")),
    ("policy loss", ("policy/loss", "policy_loss")),
    ("value loss", ("value/loss", "value_loss")),
)


def _plain(value: Any, key: str) -> Any:
    """A JSON-writable form of a metric value (tensors and numpy scalars become numbers)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    raise ValueError(f"metric {key!r} has a value of type {type(value).__name__} that cannot be "
                     f"written as JSON: {value!r:.80}")


def read_metrics(path: str | Path, torn_tail: str = "error") -> list[dict[str, Any]]:
    """All records of a metrics JSONL file, in order (blank lines skipped).

    A line that is not JSON is a ValueError naming it, except, with torn_tail="drop", when it
    is the last line: a run killed (or out of disk space) while writing leaves its last record
    cut off. That line is then dropped with a warning; what came before it is intact.
    """
    if torn_tail not in ("error", "drop"):
        raise ValueError(f"torn_tail must be 'error' or 'drop', got {torn_tail!r}")
    # bytes, not text: a cut-off multi-byte character must not stop the read before the check
    lines = Path(path).read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if index == last and torn_tail == "drop":
                warnings.warn(f"{path}: dropped its last line {index + 1}, which is cut off "
                              f"({raw[:60]!r}...); a run that was killed or ran out of disk "
                              f"space while writing it leaves this", stacklevel=2)
                break
            where = ("its last line, which is cut off" if index == last else
                     "a line in the middle of the file, so the file is damaged (not just cut "
                     "off by a crash); remove or repair that line")
            raise ValueError(f"{path}: line {index + 1} is not JSON ({error}): {where}") from None
    return records


def _summary_writer_class():
    """TensorBoard's SummaryWriter, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class MetricsLogger:
    """Appends one JSON record per `log` call to `path`, flushed at once (so `tail -f` and a
    crash both see every logged line). Also writes TensorBoard scalars to
    `<path's folder>/tensorboard` when `tensorboard=True` and the package is installed.

    append=False starts a fresh file. append=True continues one (resume): a cut-off last line
    is dropped with a warning (see read_metrics) and, with `resume_step`, records with a step
    beyond it are removed: they were logged after the checkpoint the run resumes from and will
    be logged again, so a resumed run's file equals an uninterrupted run's.
    """

    def __init__(self, path: str | Path, append: bool = False, resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        from rlhf import distributed

        self.path = Path(path)
        if not distributed.is_main():  # torchrun: rank 0 logs the reduced metrics alone
            self._file, self._tensorboard = open(os.devnull, "w"), None  # noqa: SIM115
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if append and self.path.exists():
            # A torn last line (the previous run was killed mid-write) is dropped, else the next
            # record would be glued to it and the file damaged in the middle.
            records = read_metrics(self.path, torn_tail="drop")
            kept = [r for r in records if resume_step is None
                    or not (isinstance(r.get("step"), numbers.Real) and r["step"] > resume_step)]
            text = "".join(json.dumps(r) + "\n" for r in kept)
            if text.encode() != self.path.read_bytes():
                atomic_write_text(self.path, text)
        self._file = self.path.open("a" if append else "w")
        writer_class = _summary_writer_class() if tensorboard else None
        # resumed: TensorBoard hides the events from the first step logged again on, as the
        # records past resume_step were dropped above (its curves held both otherwise)
        purge = {"purge_step": int(resume_step) + 1} if append and resume_step is not None \
            else {}
        self._tensorboard = (writer_class(log_dir=str(self.path.parent / "tensorboard"), **purge)
                             if writer_class is not None else None)

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, Any]:
        """Write one record ({"step": step} first when given, then `metrics`); returns it."""
        if self._file.closed:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        record: dict[str, Any] = {"step": int(step)} if step is not None else {}
        record.update({str(k): _plain(v, str(k)) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            x = record.get("step", record.get("iteration"))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key != "step":
                    self._tensorboard.add_scalar(key, value, global_step=x)
            self._tensorboard.flush()
        return record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _series(records: Sequence[Mapping[str, Any]], x_key: str, key: str
            ) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for index, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            x = record.get(x_key, index)
            xs.append(float(x) if isinstance(x, (int, float)) else float(index))
            ys.append(float(value))
    return xs, ys


def _printable(text: Any) -> str:
    """Generated text may hold control characters (a byte-level tokenizer can emit any byte);
    the figure's font has no glyph for them, so show them as U+FFFD."""
    return "".join(ch if ch.isprintable() else "\ufffd" for ch in str(text))


def _sample_lines(samples: Sequence[Mapping[str, Any]], width: int) -> list[str]:
    lines = []
    for number, sample in enumerate(samples, start=1):
        lines.append(f"{number}. {_printable(sample.get('prompt', ''))}")
        for side in ("before", "after"):
            if side not in sample:
                continue
            gold = sample.get(f"gold_{side}")
            label = f"   {side}" + (f" (gold {gold:+.2f})" if isinstance(gold, (int, float))
                                    else "") + ": "
            wrapped = textwrap.wrap(_printable(sample[side]).strip(),
                                    width=width - len(label)) or [""]
            lines.append(label + wrapped[0])
            lines += [" " * len(label) + more for more in wrapped[1:]]
    return lines


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path,
                samples: Sequence[Mapping[str, Any]] | None = None, x_key: str | None = None,
                title: str | None = None, after: str = "PPO") -> Path:
    """Draw the PPO curves of a metrics file into a PNG (written atomically); returns its path.

    One panel per entry of PANELS that has data (proxy reward, gold reward, KL, entropy, policy
    and value loss) against `x_key` (default: "iteration" when logged, else "step").
    `samples`: optional dicts with "prompt", "before", "after" (and "gold_before",
    "gold_after") printed under the curves; `after` names the trained policy in their caption
    (the RL algorithm). Records without a panel's key are skipped, so a
    file that mixes stages still plots. ValueError when no panel has any data.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    if x_key is None:
        x_key = "iteration" if any("iteration" in r for r in records) else "step"
    panels = []
    for panel_title, keys in PANELS:
        for key in keys:
            xs, ys = _series(records, x_key, key)
            if ys:
                panels.append((panel_title, key, xs, ys))
                break
    if not panels:
        seen = sorted({k for r in records for k in r})
        raise ValueError(f"{metrics_jsonl} has no data for any plotted metric "
                         f"({[keys for _, keys in PANELS]}); its keys are {seen}")

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    text_lines = _sample_lines(samples, width=150) if samples else []
    text_height = 0.16 * len(text_lines)
    figure = plt.figure(figsize=(5 * columns, 3.2 * rows + text_height + 1.0))
    grid_top = 1 - 0.6 / figure.get_figheight()
    grid_bottom = (text_height + 1.0) / figure.get_figheight() if text_lines else 0.08
    grid = figure.add_gridspec(rows, columns, top=grid_top - 0.04, bottom=grid_bottom,
                               hspace=0.55, wspace=0.3)
    for index, (panel_title, key, xs, ys) in enumerate(panels):
        axes = figure.add_subplot(grid[index // columns, index % columns])
        axes.plot(xs, ys, marker="." if len(xs) < 60 else None, linewidth=1.5)
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel(x_key)
        axes.set_ylabel(key, fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(title or f"RLHF curves: {Path(metrics_jsonl).name}", fontsize=12,
                    y=1 - 0.15 / figure.get_figheight())
    if text_lines:
        figure.text(0.01, (text_height + 0.3) / figure.get_figheight(),
                    f"Samples before (SFT) and after ({after}):\n" + "\n".join(text_lines),
                    family="monospace", fontsize=7.5, va="top", ha="left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buffer.getvalue())
    return out_png
