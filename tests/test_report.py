"""The picture of a run (``report.png``, ``ftengine report``) and the tensorboard logging plugin."""

import json
import sys
import xml.etree.ElementTree as ElementTree

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner
from ftengine import hookimpl
from ftengine.build import configure
from ftengine.cli import cli, draw_run_report
from ftengine.errors import ConfigError, PluginError
from ftengine.loop import train
from ftengine.plugins import tensorboard as tensorboard_plugin
from ftengine.report import MAX_FRACTION_METRICS, comparison_rows, draw_report, run_headline_metrics, smoothed, split_metrics
from ftengine.rundir import move_run_aside
from ftengine.state import RunState
from ftengine_contacts.task import write_splits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, channels = matplotlib.image.imread(path).shape
    assert (width, height) == (1400, 850) and channels == 4  # figsize (14, 8.5) at 100 dpi


def write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def contacts_run(tiny_model_dir, tmp_path_factory):
    """``(result, output_dir)`` of ``ftengine run`` on the tiny model with the contacts task's
    metrics (rates before/after), an evaluation every 2 steps and the tensorboard plugin."""
    root = tmp_path_factory.mktemp("contacts-run")
    data = write_splits(root / "data", n_train=16, n_valid=4, n_prefs=1, n_prefs_valid=1)
    out = root / "out"
    overrides = [
        f"model={tiny_model_dir}",
        f"data.train={data['train']}",
        f"data.eval={data['valid']}",
        f"output_dir={out}",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.eval_every=2",
        "contacts.max_new_tokens=8",
    ]
    args = ["run", "--plugin", "lora", "--plugin", "contacts", "--plugin", "tensorboard", "--eval-before"]
    result = invoke(*args, *(a for o in overrides for a in ("-o", o)))
    assert result.exit_code == 0, result.output
    return result, out


def test_a_run_ends_by_drawing_its_report(contacts_run):
    result, out = contacts_run
    assert f"report: {out / 'report.png'}" in " ".join(result.output.split())
    assert_png(out / "report.png")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_ftengine_report_redraws_png_and_svg_from_metrics(contacts_run, tmp_path):
    _, out = contacts_run
    (out / "report.png").unlink()
    result = invoke("report", str(out))
    assert result.exit_code == 0, result.output
    assert_png(out / "report.png")
    svg = tmp_path / "pictures" / "run.svg"
    assert invoke("report", str(out), "--output", str(svg)).exit_code == 0
    root = ElementTree.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = svg.read_text()
    # The contacts metrics are drawn as bars, the eval loss as a table cell.
    assert "exact_match" in text and "schema_valid" in text and "field_email" in text


def test_the_rows_of_a_real_run_are_before_and_after(contacts_run):
    _, out = contacts_run
    records = read_records(out / "metrics.jsonl")
    rows = comparison_rows(records)
    assert list(rows) == ["before", "after"] and (rows["before"]["step"], rows["after"]["step"]) == (0, 4)
    fractions, others = split_metrics(rows, run_headline_metrics(out))
    assert fractions[:2] == ["eval_exact_match", "eval_schema_valid"]
    assert others == ["eval_loss", "eval_prompt_tokens", "eval_time_s"]  # a time or a count is never a rate
    assert {k for k in fractions if k.startswith("eval_field_")} == {
        f"eval_field_{f}" for f in ("name", "age", "city", "email", "phone", "date")
    }


def scalars_in(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_scalars(records):
    expected = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                tag = f"baseline/{record['baseline']}/{key}" if "baseline" in record else key
                expected.setdefault(tag, []).append((record["step"], value))
    return expected


def assert_same_scalars(found, expected):
    assert sorted(found) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in found[tag]] == [step for step, _ in points], tag
        assert [value for _, value in found[tag]] == pytest.approx([value for _, value in points], rel=1e-6), tag


def test_tensorboard_events_hold_every_number_of_metrics_jsonl(contacts_run):
    _, out = contacts_run
    records = read_records(out / "metrics.jsonl")
    found = scalars_in(out / "tensorboard")
    assert {"loss", "lr", "grad_norm", "eval_loss", "eval_exact_match"} <= set(found)
    assert [step for step, _ in found["eval_loss"]] == [0, 2, 4]
    assert_same_scalars(found, expected_scalars(records))


HANDMADE = [
    {"step": 0, "eval_loss": 1.2, "eval_exact_match": 0.0, "eval_schema_valid": 0.0, "eval_drift_kl": 0.0, "eval_drift_ppl": 9.5},
    {"step": 0, "baseline": "few_shot_3", "eval_loss": 1.0, "eval_exact_match": 0.25, "eval_schema_valid": None},
    {"step": 0, "baseline": "prompted", "eval_loss": 1.1, "eval_exact_match": 0.1, "eval_heldout_exact_match": 0.05},
    *(
        {"step": s, "epoch": 0, "loss": None if s == 3 else 2.0 / s, "lr": 1e-3 * (1 - s / 6), "grad_norm": None}
        for s in range(1, 7)
    ),
    {"step": 3, "eval_loss": None, "eval_exact_match": 0.5, "eval_schema_valid": 0.75, "eval_drift_kl": None},
    {"step": 4, "loss": None, "grad_norm": None, "skipped": "nonfinite"},
    {
        "step": 6,
        "eval_loss": 0.4,
        "eval_exact_match": 0.8,
        "eval_schema_valid": 1.0,
        "eval_heldout_exact_match": 0.6,
        "eval_field_name": 0.9,
        "eval_drift_kl": 0.2,
        "eval_drift_ppl": 10.5,
    },
]


def test_handmade_metrics_with_baselines_and_nulls_draw(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, HANDMADE)
    assert draw_report(run_dir) == run_dir / "report.png"
    assert_png(run_dir / "report.png")
    rows = comparison_rows(HANDMADE)
    assert list(rows) == ["before", "few_shot_3", "prompted", "after"]
    assert rows["after"] is HANDMADE[-1]
    fractions, others = split_metrics(rows, headline=["exact_match", "schema_valid"])
    assert fractions == ["eval_exact_match", "eval_schema_valid", "eval_heldout_exact_match", "eval_field_name"]
    assert others == ["eval_loss", "eval_drift_kl", "eval_drift_ppl"]


def test_every_evaluation_sets_headline_metrics_come_before_the_per_field_ones():
    """Three sets of six per-field rates: the blind set's exact_match used to be the 14th rate,
    past what the panel shows."""
    fields = ("name", "age", "city", "email", "phone", "date")
    after = {"step": 9, "eval_loss": 0.3}
    for prefix in ("", "heldout_", "blind_"):
        after |= {f"eval_{prefix}schema_valid": 0.9, f"eval_{prefix}exact_match": 0.5}
        after |= {f"eval_{prefix}field_{field}": 0.7 for field in fields}
    fractions, _ = split_metrics({"after": after}, headline=["exact_match", "schema_valid"])
    assert fractions[:6] == [
        "eval_exact_match",
        "eval_schema_valid",
        "eval_heldout_exact_match",
        "eval_heldout_schema_valid",
        "eval_blind_exact_match",
        "eval_blind_schema_valid",
    ]
    assert len(fractions) == 24 and MAX_FRACTION_METRICS >= 6


def test_the_run_s_task_plugin_declares_its_headline_metrics(contacts_run, tmp_path):
    _, out = contacts_run
    assert run_headline_metrics(out) == ["exact_match", "schema_valid"]
    assert run_headline_metrics(tmp_path) == []  # no config.json: no preference, still drawn


def test_the_training_loss_is_drawn_smoothed_over_the_raw_line():
    assert smoothed([1.0, 1.0, 1.0], window=5) == pytest.approx([1.0, 1.0, 1.0])  # debiased from the start
    noisy = [2.0, 0.0] * 50
    assert max(smoothed(noisy, window=10)[20:]) < 1.3 and min(smoothed(noisy, window=10)[20:]) > 0.7
    assert smoothed([float("nan"), 3.0], window=1)[1] == 3.0


def test_report_of_a_directory_without_metrics_is_a_clear_error_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "not-a-run"
    run_dir.mkdir()
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"{run_dir / 'metrics.jsonl'}: not found, so {run_dir} is not a run directory" in message
    assert list(run_dir.iterdir()) == []
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing"), "--output", str(tmp_path / "r.svg")])
    assert result.exit_code == 2 and "no such directory, not a run directory" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-run"]


def test_an_unreadable_line_is_named_and_the_previous_report_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, HANDMADE)
    draw_report(run_dir)
    before = (run_dir / "report.png").read_bytes()
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 7, "loss": 0.3\n')
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert f"{run_dir / 'metrics.jsonl'}:{len(HANDMADE) + 1}: not valid JSON" in " ".join(result.output.split())
    assert (run_dir / "report.png").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "report.png"]


def test_report_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, HANDMADE)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if 'ftengine[report]' were not installed
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 2 and "pip install 'ftengine[report]'" in " ".join(result.output.split())
    # At the end of a run: one line, and the run goes on.
    draw_run_report(str(run_dir))
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and "pip install 'ftengine[report]'" in printed.out
    assert f"ftengine report {run_dir}" in printed.out
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]


def test_overwrite_moves_the_earlier_report_aside_with_the_run(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, HANDMADE)
    draw_report(run_dir)
    (run_dir / "final").mkdir()
    moved = move_run_aside(run_dir)
    assert sorted(p.name for p in moved.iterdir()) == ["final", "metrics.jsonl", "report.png"]


def test_a_report_that_cannot_be_drawn_never_fails_the_run(tmp_path, capsys):
    draw_run_report(str(tmp_path))  # no metrics.jsonl: drawing fails
    printed = capsys.readouterr()
    assert printed.err.startswith("warning: report.png was not drawn:") and printed.err.count("\n") == 1


def tensorboard_state(run_overrides, tmp_path, step=0, log_dir=None):
    overrides = run_overrides + ([f"tensorboard.log_dir={log_dir}"] if log_dir else [])
    config, pm = configure(None, ["full", "tensorboard"], overrides)
    return RunState(config=config, pm=pm, output_dir=tmp_path / "out", device=torch.device("cpu"), step=step)


def log_records(state, records):
    tensorboard_plugin.ftengine_on_train_start(state=state)
    for record in records:
        tensorboard_plugin.ftengine_on_log(state=state, record=record)
    tensorboard_plugin.ftengine_on_train_end(state=state)
    assert "tensorboard" not in state.plugin_data


def test_tensorboard_tags_baselines_and_leaves_out_nulls(run_overrides, tmp_path):
    log_dir = tmp_path / "elsewhere"
    log_records(tensorboard_state(run_overrides, tmp_path, log_dir=log_dir), HANDMADE)
    found = scalars_in(log_dir)
    assert_same_scalars(found, expected_scalars(HANDMADE))
    assert found["baseline/few_shot_3/eval_exact_match"] == [(0, 0.25)]
    assert "baseline/few_shot_3/eval_schema_valid" not in found and "grad_norm" not in found
    assert [step for step, _ in found["loss"]] == [1, 2, 4, 5, 6]
    assert not (tmp_path / "out" / "tensorboard").exists()


def test_a_resumed_run_hides_the_events_after_its_checkpoint(run_overrides, tmp_path):
    first = [{"step": s, "loss": float(s)} for s in range(1, 5)]
    log_records(tensorboard_state(run_overrides, tmp_path), first)
    resumed = [{"step": s, "loss": 10.0 * s} for s in range(3, 5)]
    log_records(tensorboard_state(run_overrides, tmp_path, step=2), resumed)
    assert scalars_in(tmp_path / "out" / "tensorboard")["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_overwrite_moves_the_earlier_runs_tensorboard_events_aside(run_overrides, tmp_path):
    """A plugin's files go with the run they belong to: the new run's events start afresh and
    the earlier run's are kept (they were left in place, shown under the new run's curves)."""
    out = tmp_path / "out"
    overrides = run_overrides + ["train.max_steps=2", "train.eval_every=0"]
    train(*configure(None, ["lora", "tensorboard"], overrides))
    earlier = scalars_in(out / "tensorboard")["loss"]
    train(*configure(None, ["lora", "tensorboard"], [*overrides, "train.max_steps=1"]), overwrite=True)
    (moved,) = out.glob("replaced-*")
    assert sorted(p.name for p in moved.iterdir()) == ["config.json", "final", "metrics.jsonl", "tensorboard"]
    assert scalars_in(moved / "tensorboard")["loss"] == earlier and len(earlier) == 2
    assert [step for step, _ in scalars_in(out / "tensorboard")["loss"]] == [1]


@pytest.mark.parametrize("returned", ["tensorboard", ["../elsewhere"], ["/tmp/events"]])
def test_run_files_outside_output_dir_are_refused_before_anything_moves(run_overrides, tmp_path, returned):
    """A plugin naming a bare string (moved letter by letter) or a path outside ``output_dir``
    would have ``--overwrite`` move things that are not the run's: refused, naming the plugin."""

    class Careless:
        @hookimpl
        def ftengine_run_files(self, config):
            return returned

    overrides = run_overrides + ["train.max_steps=1"]
    train(*configure(None, ["lora"], overrides))
    config, pm = configure(None, ["lora"], overrides)
    pm.register(Careless(), name="careless")
    with pytest.raises(PluginError, match=r"plugin 'careless': ftengine_run_files returned .*inside output_dir"):
        train(config, pm, overwrite=True)
    assert not list((tmp_path / "out").glob("replaced-*")) and (tmp_path / "out" / "final").is_dir()


def test_the_tensorboard_plugin_without_tensorboard_is_a_config_error(run_overrides, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if 'ftengine[tensorboard]' were not installed
    with pytest.raises(ConfigError, match=r"plugin 'tensorboard' needs the tensorboard package, which is not installed: "):
        configure(None, ["full", "tensorboard"], run_overrides)
