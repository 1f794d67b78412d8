"""The picture of a run, drawn from its ``metrics.jsonl``: training and evaluation loss against
steps, the learning rate, and the evaluation metrics before training, of each baseline and
after training.

    ftengine report runs/contacts                      # writes runs/contacts/report.png
    ftengine report runs/contacts --output run.svg     # SVG

``ftengine run`` draws ``output_dir/report.png`` at its end when matplotlib is installed
(``pip install 'ftengine[report]'``). matplotlib is imported here only, when drawing, and only
its ``Figure`` is used: no pyplot, no GUI backend (PNG goes through Agg). The file is written
atomically: a failed drawing leaves no file, or the previous one.

Rows of the metrics panel: ``before`` is the first evaluation at step 0 (zero-shot), each
record holding ``"baseline": LABEL`` is a row named LABEL, ``after`` is the last evaluation.
"""

import json
import math
from pathlib import Path

from . import checkpoint
from .errors import DataError, FtengineError, RunDirError

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.png"
FORMATS = {".png": "png", ".svg": "svg"}
#: At most this many bars groups: more would be unreadable; the rest stay in metrics.jsonl.
MAX_FRACTION_METRICS = 10
#: Metrics shown first, in this order (then held-out ones, then per-field ones, then the rest).
HEADLINE = ("exact_match", "schema_valid")
#: Words of evaluation keys that are never fractions, whatever their value (eval_time_s may be 0.4).
NOT_FRACTIONS = ("loss", "kl", "ppl", "time", "tokens")


def read_metrics(run_dir):
    """The records of ``run_dir/metrics.jsonl``, in order.

    :raises RunDirError: no ``metrics.jsonl`` (not a run directory).
    :raises DataError: a line that is not a JSON object with a ``step``, named ``file:line``.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "no such directory"
        raise RunDirError(f"{run_dir}: {what}, not a run directory; give the output_dir of a run (it holds {METRICS_FILE})")
    if not path.is_file():
        raise RunDirError(
            f"{path}: not found, so {run_dir} is not a run directory; give the output_dir of a run "
            f"(a run writes its metrics to output_dir/{METRICS_FILE})"
        )
    records = []
    with open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one metrics record") from None
            if not isinstance(record, dict) or not _is_number(record.get("step")):
                raise DataError(f"{path}:{number}: not a metrics record (a JSON object with a numeric 'step')")
            records.append(record)
    if not records:
        raise DataError(f"{path}: holds no metrics record yet; draw the report once the run has logged a step")
    return records


def _is_number(value):
    return isinstance(value, int | float) and not isinstance(value, bool)


def _value(record, key):
    """A record's number under ``key``, NaN when absent or null (matplotlib leaves a gap)."""
    value = record.get(key)
    return float(value) if _is_number(value) else math.nan


def _is_eval(record):
    return any(key.startswith("eval_") for key in record)


def comparison_rows(records):
    """``{label: eval record}``: ``before``, each baseline by its label, ``after``, in that order.

    A label seen twice (a resumed run) keeps its last record.
    """
    evals = [r for r in records if _is_eval(r) and "baseline" not in r]
    before = next((r for r in evals if r["step"] == 0), None)
    rows = {"before": before} if before is not None else {}
    for record in records:
        if _is_eval(record) and "baseline" in record:
            rows[str(record["baseline"])] = record
    if evals and evals[-1] is not before:
        rows["after"] = evals[-1]
    return rows


def _order(key):
    name = key.removeprefix("eval_")
    heldout = name.startswith("heldout_")
    name = name.removeprefix("heldout_")
    if name in HEADLINE:
        return (0, heldout, HEADLINE.index(name))
    return (1 if name.startswith("field_") else 2, heldout, 0)


def split_metrics(rows):
    """``(fractions, others)``: the evaluation keys whose values all lie in [0, 1] (rates,
    accuracies), first those the panel prefers; and the rest (losses, drift), in file order."""
    keys = list(dict.fromkeys(k for r in rows.values() for k in r if k.startswith("eval_")))
    fractions, others = [], []
    for key in keys:
        values = [r[key] for r in rows.values() if _is_number(r.get(key))]
        name = key.removeprefix("eval_")
        if values and all(0 <= v <= 1 for v in values) and not any(w in name.split("_") for w in NOT_FRACTIONS):
            fractions.append(key)
        else:
            others.append(key)
    return sorted(fractions, key=_order), others


def draw_report(run_dir, output=None):
    """Draw the report of the run in ``run_dir``; return the path written.

    :param output: the file to write (default ``run_dir/report.png``); ``.svg`` writes SVG.
    :raises RunDirError: ``run_dir`` holds no ``metrics.jsonl``.
    :raises DataError: a line of it cannot be read.
    :raises FtengineError: matplotlib is not installed, or ``output`` is neither .png nor .svg.
    """
    run_dir = Path(run_dir)
    output = Path(output) if output is not None else run_dir / REPORT_FILE
    file_format = FORMATS.get(output.suffix.lower())
    if file_format is None:
        raise FtengineError(f"{output}: the report is written as PNG or SVG: give a path ending in .png or .svg")
    if output.is_dir():
        raise FtengineError(f"{output}: is a directory; give the file to write, e.g. {output / REPORT_FILE}")
    records = read_metrics(run_dir)
    figure = _figure(records, title=str(run_dir))
    return checkpoint.atomic_write(output, lambda tmp: figure.savefig(tmp, format=file_format, dpi=100))


def _matplotlib_figure():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise FtengineError(
            "drawing the report needs matplotlib, which is not installed: pip install 'ftengine[report]'"
        ) from None
    return Figure


def matplotlib_installed():
    """Whether ``draw_report`` can draw (matplotlib imports)."""
    try:
        _matplotlib_figure()
    except FtengineError:
        return False
    return True


def _figure(records, title):
    Figure = _matplotlib_figure()
    figure = Figure(figsize=(14, 8.5), layout="constrained")
    grid = figure.add_gridspec(2, 3)
    figure.suptitle(title)
    _draw_losses(figure.add_subplot(grid[0, :2]), records)
    _draw_lr(figure.add_subplot(grid[0, 2]), records)
    rows = comparison_rows(records)
    fractions, others = split_metrics(rows)
    _draw_fractions(figure.add_subplot(grid[1, :2]), rows, fractions)
    _draw_numbers(figure.add_subplot(grid[1, 2]), rows, others)
    return figure


def _no_data(axes, text):
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray")


def _draw_losses(axes, records):
    axes.set_title("loss")
    axes.set_xlabel("step")
    train = [r for r in records if "loss" in r and not _is_eval(r)]
    evals = [r for r in records if "eval_loss" in r and "baseline" not in r]
    if train:
        axes.plot([r["step"] for r in train], [_value(r, "loss") for r in train], label="train loss", linewidth=1.2)
    if evals:
        axes.plot([r["step"] for r in evals], [_value(r, "eval_loss") for r in evals], "o-", label="eval loss")
    if train or evals:
        axes.legend()
        axes.grid(alpha=0.3)
    else:
        _no_data(axes, "no loss logged")


def _draw_lr(axes, records):
    axes.set_title("learning rate")
    axes.set_xlabel("step")
    logged = [r for r in records if "lr" in r]
    if not logged:
        _no_data(axes, "no learning rate logged")
        return
    axes.plot([r["step"] for r in logged], [_value(r, "lr") for r in logged])
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes.grid(alpha=0.3)


def _draw_fractions(axes, rows, fractions):
    shown = fractions[:MAX_FRACTION_METRICS]
    left_out = len(fractions) - len(shown)
    axes.set_title("evaluation" + (f" ({left_out} more metrics in {METRICS_FILE})" if left_out else ""))
    if not shown:
        _no_data(axes, "no rate metrics evaluated")
        return
    width = 0.8 / len(rows)
    for i, (label, record) in enumerate(rows.items()):
        positions = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(shown))]
        values = [_value(record, key) for key in shown]
        bars = axes.bar(positions, values, width, label=f"{label} (step {record['step']})")
        # A label on each bar tells 0% from a metric this row did not evaluate (no bar either way).
        axes.bar_label(bars, ["" if math.isnan(v) else f"{v:.0%}" for v in values], fontsize=7, padding=1)
        for position, value in zip(positions, values):
            if math.isnan(value):
                axes.text(position, 0.01, "n/a", ha="center", va="bottom", fontsize=7, color="gray")
    axes.set_xticks(range(len(shown)), [key.removeprefix("eval_") for key in shown], rotation=25, ha="right")
    axes.set_ylim(0, 1.1)
    axes.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small")


def _format(value):
    return f"{value:.4g}" if _is_number(value) else "-"


def _draw_numbers(axes, rows, keys):
    axes.axis("off")
    axes.set_title("losses and other metrics")
    if not keys:
        _no_data(axes, "none evaluated")
        return
    table = axes.table(
        cellText=[[_format(record.get(key)) for record in rows.values()] for key in keys],
        rowLabels=[key.removeprefix("eval_") for key in keys],
        colLabels=list(rows),
        loc="upper center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
