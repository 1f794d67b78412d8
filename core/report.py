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
The metrics the run's task plugins declare as headline (hook ``ftengine_headline_metrics``)
come first, for every evaluation set (``eval_<metric>``, ``eval_<set>_<metric>``).
"""

import json
import math
from pathlib import Path

from . import checkpoint
from .errors import DataError, FtengineError, RunDirError

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.png"
FORMATS = {".png": "png", ".svg": "svg"}
#: At most this many bar groups: more would be unreadable; the rest stay in metrics.jsonl.
MAX_FRACTION_METRICS = 10
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


def _headline_order(key, headline):
    """``(headline index, set name)`` of an ``eval_[<set>_]<metric>`` key whose metric is in
    ``headline``; ``None`` for any other key."""
    name = key.removeprefix("eval_")
    for index, metric in enumerate(headline):
        if name == metric:
            return index, ""
        if name.endswith(f"_{metric}"):
            return index, name.removesuffix(f"_{metric}")
    return None


def split_metrics(rows, headline=()):
    """``(fractions, others)``: the evaluation keys whose values all lie in [0, 1] (rates,
    accuracies), the ``headline`` metrics first (set by set, in the order the sets appear, each
    set's in ``headline``'s order), the rest in file order; and the other keys (losses, drift),
    in file order."""
    keys = list(dict.fromkeys(k for r in rows.values() for k in r if k.startswith("eval_")))
    fractions, others = [], []
    for key in keys:
        values = [r[key] for r in rows.values() if _is_number(r.get(key))]
        name = key.removeprefix("eval_")
        if values and all(0 <= v <= 1 for v in values) and not any(w in name.split("_") for w in NOT_FRACTIONS):
            fractions.append(key)
        else:
            others.append(key)
    ranked = {key: order for key in fractions if (order := _headline_order(key, headline)) is not None}
    sets = list(dict.fromkeys(name for _, name in sorted(ranked.values(), key=lambda o: o[1] != "")))
    first = sorted(ranked, key=lambda key: (sets.index(ranked[key][1]), ranked[key][0]))
    return first + [key for key in fractions if key not in ranked], others


def run_headline_metrics(run_dir):
    """The headline metrics the plugins of the run in ``run_dir`` declare (its ``config.json``
    names them); none when the run's config or one of its plugins cannot be read."""
    from .pluginmanager import select_plugins

    try:
        plugins = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8")).get("plugins") or []
        return headline_metrics(select_plugins([p for p in plugins if isinstance(p, str)]))
    except (OSError, ValueError, AttributeError, FtengineError):
        return []


def headline_metrics(pm):
    """Every headline metric the plugins of ``pm`` declare, in plugin order."""
    return list(dict.fromkeys(name for names in pm.hook.ftengine_headline_metrics() for name in names or ()))


def draw_report(run_dir, output=None, headline=None):
    """Draw the report of the run in ``run_dir``; return the path written.

    :param output: the file to write (default ``run_dir/report.png``); ``.svg`` writes SVG.
    :param headline: the metrics shown first (default: what the run's plugins declare).
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
    headline = run_headline_metrics(run_dir) if headline is None else headline
    figure = _figure(records, title=str(run_dir), headline=headline)
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


def _figure(records, title, headline):
    Figure = _matplotlib_figure()
    figure = Figure(figsize=(14, 8.5), layout="constrained")
    grid = figure.add_gridspec(2, 3)
    figure.suptitle(title)
    _draw_losses(figure.add_subplot(grid[0, :2]), records)
    _draw_lr(figure.add_subplot(grid[0, 2]), records)
    rows = comparison_rows(records)
    fractions, others = split_metrics(rows, headline)
    _draw_fractions(figure.add_subplot(grid[1, :2]), rows, fractions)
    _draw_numbers(figure.add_subplot(grid[1, 2]), rows, others)
    return figure


def _no_data(axes, text):
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray")


def smoothed(values, window):
    """An exponential moving average over about ``window`` values, debiased at the start (as
    TensorBoard smooths); NaN values (skipped steps) are passed over."""
    weight, average, count, out = 1 - 1 / max(window, 1), 0.0, 0, []
    for value in values:
        if not math.isnan(value):
            average, count = weight * average + (1 - weight) * value, count + 1
        out.append(average / (1 - weight**count) if count else math.nan)
    return out


def _draw_losses(axes, records):
    axes.set_title("loss")
    axes.set_xlabel("step")
    train = [r for r in records if "loss" in r and not _is_eval(r)]
    evals = [r for r in records if "eval_loss" in r and "baseline" not in r]
    if train:
        steps, losses = [r["step"] for r in train], [_value(r, "loss") for r in train]
        # One-example steps are noisy: the raw line in the background, a smoothed one on top.
        (raw,) = axes.plot(steps, losses, linewidth=0.8, alpha=0.3, label="train loss")
        window = max(1, len(train) // 20)
        axes.plot(
            steps, smoothed(losses, window), linewidth=1.8, color=raw.get_color(), label=f"train loss, smoothed (~{window} steps)"
        )
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
    # Outside the axes, so no bar or bar label is ever hidden behind it.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


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
