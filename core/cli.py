"""The ``ftengine`` command line: ``run``, ``plugins``, ``report``, plus commands plugins register."""

import errno
import faulthandler
import json
import os
import shlex
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .distributed import launched_world_size
from .errors import FtengineError
from .inference import generate_command, merge
from .log import warn
from .server import serve_command
from .signals import RunInterrupted

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole, copy-pasteable


class FtengineGroup(click.Group):
    """Prints ftengine's own errors as messages, not tracebacks, and exits with status 2; so are
    a full disk and a file that cannot be written, wherever they happen."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FtengineError as exc:
            if getattr(exc, "quiet", False):  # another rank reported it
                sys.exit(2)
            _error(exc)
        except KeyboardInterrupt as exc:  # Ctrl-C before training started, or a second one
            err_console.print(f"[bold yellow]interrupted[/bold yellow] ({exc or 'SIGINT'})", highlight=False)
            sys.exit(getattr(exc, "exit_code", 130))
        except Exception as exc:
            message = _storage_message(exc)
            if message is None:
                raise
            _error(message)


def _rank():
    """This process's rank in a run started by ``torch.distributed.run`` (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _error(message):
    # Escaped: messages quote user text and names like ftengine[serve], not rich markup.
    where = f"rank {_rank()}: " if _rank() else ""
    err_console.print(f"[bold red]error:[/bold red] {where}{escape(str(message))}", highlight=False)
    sys.exit(2)


def _storage_message(exc):
    """A message for a disk-full or permission failure outside the places that explain their own."""
    from .checkpoint import no_space

    path = getattr(exc, "filename", None) or "a file"
    if no_space(exc):
        return f"{path}: no space left on device; free some space or set output_dir to a larger disk ({exc})"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: {exc.strerror}; choose a location you can write to"
    return None


@click.group(cls=FtengineGroup)
@click.version_option(__version__, prog_name="ftengine")
def cli():
    """ftengine: fine-tune pre-trained language models with plugins.

    Run 'ftengine run' with no arguments for the default job an installed task package
    provides (the demo in examples/contacts, which make install installs: fine-tune
    SmolLM2-135M-Instruct on contact extraction and show before/after).
    """


@cli.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--plugin",
    "-p",
    "plugins",
    multiple=True,
    help="Activate a plugin (repeatable): built-in name, entry-point name or module path; no:NAME blocks a default plugin.",
)
@click.option("--override", "-o", "overrides", multiple=True, help="Set a config key: -o train.lr=1e-4 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in output_dir.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh in an output_dir that holds an earlier run: its files are moved into output_dir/replaced-<time>/.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Load model weights from pickle files (pytorch_model.bin), which can run code; same as -o hf_loader.allow_pickle=true.",
)
@click.option(
    "--eval-before/--no-eval-before", default=None, help="Also evaluate before training (default: on for the default job)."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Train on N processes on this machine (one per GPU), through torch.distributed.run; add --plugin ddp or fsdp.",
)
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, help="Machines in a multi-node run.")
@click.option(
    "--node-rank", type=click.IntRange(min=0), default=None, help="This machine's rank in a multi-node run (0 .. nnodes-1)."
)
@click.option(
    "--rdzv-endpoint",
    default=None,
    help="host:port of node 0 where the nodes of a multi-node run meet (as torchrun's --rdzv-endpoint).",
)
def run(config_file, plugins, overrides, resume, overwrite, allow_pickle, eval_before, nproc, nnodes, node_rank, rdzv_endpoint):
    """Train: CONFIG_FILE (YAML) plus --plugin and -o overrides.

    With neither CONFIG_FILE nor --plugin, runs the default job an installed task package
    provides (overrides apply on top of it, e.g. -o train.max_steps=10).

    A run owns its output_dir: a second run into it is refused while the first runs, and a
    fresh run into a directory that holds an earlier run needs --resume or --overwrite (the
    default job moves its earlier result aside by itself).

    With --nproc N (and --nnodes, --node-rank, --rdzv-endpoint on several machines) the config
    is checked here, then N workers start through torch.distributed.run; train.batch_size stays
    the global micro-batch. See docs/distributed.md.
    """
    from .build import configure
    from .loop import train
    from .pluginmanager import allow_pickle_sections

    if resume and overwrite:
        raise click.UsageError("--resume continues the run in output_dir and --overwrite replaces it: give one of them")
    default_job = config_file is None and not plugins
    base = installed_default_job() if default_job else None
    # The demo is meant to be rerun: its earlier result is moved aside (never deleted).
    overwrite = overwrite or (default_job and not resume)
    if allow_pickle:  # as overrides, so the resume command keeps it
        overrides = (
            *overrides,
            *(
                f"{name}.{key}={json.dumps(value)}"
                for name, keys in allow_pickle_sections().items()
                for key, value in keys.items()
            ),
        )
    launching = (nproc or 1) * nnodes > 1
    world_size = (nproc or 1) * nnodes if launching else None
    config, pm = configure(config_file, plugins, overrides, base=base, world_size=world_size)
    if eval_before is None:  # the default job's zero_shot baseline is its "before"
        eval_before = default_job and "zero_shot" not in config.eval.baselines
    if launching:
        worker = worker_args(config_file, plugins, overrides, resume, overwrite, eval_before)
        launch_workers(nproc or 1, nnodes, node_rank, rdzv_endpoint, worker)
    try:
        summary = train(config, pm, resume=resume, eval_before=eval_before, overwrite=overwrite)
    except RunInterrupted as exc:
        command = resume_command(config_file, plugins, overrides, eval_before if eval_before != default_job else None)
        if not _rank():
            err_console.print(f"[bold yellow]interrupted:[/bold yellow] {exc}\ncontinue with:\n  {command}", highlight=False)
        sys.exit(exc.exit_code)
    if not _rank():
        print_summary(summary)
        draw_run_report(summary["output_dir"])


def installed_default_job():
    """The config of the default job an installed package provides (hook ``ftengine_default_job``)."""
    from .pluginmanager import all_plugins_manager

    job = all_plugins_manager().hook.ftengine_default_job()
    if job is None:
        raise click.UsageError(
            "no default job is installed: give a CONFIG_FILE or --plugin (see docs/configuration.md), "
            "or install the demo task that provides one: pip install ./examples/contacts from a source "
            "checkout (make install does it), then run 'ftengine run' again"
        )
    return job


def worker_args(config_file, plugins, overrides, resume, overwrite, eval_before):
    """The ``ftengine run`` arguments each worker of a launched run gets (no launch flags)."""
    args = [config_file] if config_file else []
    for plugin in plugins:
        args += ["--plugin", plugin]
    for override in overrides:
        args += ["-o", override]
    args += ["--resume"] * resume + ["--overwrite"] * overwrite
    return [*args, "--eval-before" if eval_before else "--no-eval-before"]


def launch_workers(nproc, nnodes, node_rank, rdzv_endpoint, worker):
    """Replace this process by ``torch.distributed.run`` starting ``nproc`` workers here: its
    exit status is the run's, and a signal sent to this process reaches every worker.

    On one machine the rendezvous is standalone; on several, torchrun's flags pass through.
    """
    if nnodes > 1 and (node_rank is None or not rdzv_endpoint):
        raise click.UsageError("a run on several machines (--nnodes) needs --node-rank and --rdzv-endpoint on each")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1 and not rdzv_endpoint:
        launcher.append("--standalone")
    else:
        launcher += [f"--nnodes={nnodes}", f"--node-rank={node_rank or 0}", f"--rdzv-endpoint={rdzv_endpoint}"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*launcher, "-m", "ftengine.cli", "run", *worker])


def resume_command(config_file, plugins, overrides, eval_before):
    """The ``ftengine run ... --resume`` command that continues an interrupted run."""
    args = ["ftengine", "run"] + ([config_file] if config_file else [])
    for plugin in plugins:
        args += ["--plugin", plugin]
    for override in overrides:
        args += ["-o", override]
    if eval_before is not None:
        args.append("--eval-before" if eval_before else "--no-eval-before")
    return shlex.join([*args, "--resume"])


def print_summary(summary):
    """The evaluation table (a column per evaluation: before, each baseline, after) and where
    the result was saved."""
    columns = {"before": summary.get("before")} if summary.get("before") else {}
    for label, record in (summary.get("baselines") or {}).items():
        columns[BASELINE_TITLES.get(label, label).format(**record)] = record
    columns["fine-tuned" if summary.get("baselines") else "after"] = summary.get("after") or {}
    keys = list(dict.fromkeys(k for record in columns.values() for k in record if k.startswith("eval_") and k != "eval_time_s"))
    if keys:
        table = Table(title="evaluation", show_lines=False)
        table.add_column("metric")
        for title in columns:
            table.add_column(title, justify="right")
        for key in keys:
            table.add_row(key.removeprefix("eval_"), *(_fmt(record.get(key)) for record in columns.values()))
        console.print(table)
    console.print(time_breakdown(summary), highlight=False, soft_wrap=True)
    data = summary.get("data", {}).get("train", {})
    if data.get("truncated"):
        console.print(f"{data['truncated']} training sequences were truncated to train.max_length ({data['dropped']} dropped)")
    console.print(f"saved: [bold]{summary['saved']}[/bold]  (metrics: {summary['output_dir']}/metrics.jsonl)")


def time_breakdown(summary):
    """Where the run's time went: set-up (tokenizer, data, model), each evaluation, training."""

    def seconds(label, record):
        return [f"{label} {record['eval_time_s']:.0f} s"] if record and record.get("eval_time_s") is not None else []

    parts = [f"set-up {summary.get('setup_s', 0):.0f} s", *seconds("before", summary.get("before"))]
    for label, record in (summary.get("baselines") or {}).items():
        parts += seconds(BASELINE_TITLES.get(label, label).format(**record), record)
    parts.append(f"training {summary.get('train_s', 0):.0f} s")
    parts += seconds("final evaluation", summary.get("after"))
    return "time: " + ", ".join(parts)


BASELINE_TITLES = {"zero_shot": "zero-shot", "few_shot": "few-shot (k={shots})"}


def draw_run_report(output_dir):
    """Draw ``output_dir/report.png`` at the end of a run; a picture never fails the run."""
    from .report import REPORT_FILE, draw_report, matplotlib_installed

    if not matplotlib_installed():
        line = f"no {REPORT_FILE}: pip install 'ftengine[report]', then: ftengine report {shlex.quote(output_dir)}"
        console.print(escape(line), soft_wrap=True, highlight=False)
        return
    try:
        path = draw_report(output_dir)
    except Exception as exc:  # the run itself succeeded: its result is saved
        warn(f"{REPORT_FILE} was not drawn: {exc}")
        return
    console.print(f"report: [bold]{escape(str(path))}[/bold]", soft_wrap=True, highlight=False)


def _fmt(value):
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins_command(as_json):
    """List the available plugins, where they come from and the hooks they implement."""
    from .pluginmanager import describe_plugins

    rows = describe_plugins()
    if as_json:
        click.echo(json.dumps([dict(zip(("name", "version", "source", "default", "hooks"), r)) for r in rows], indent=1))
        return
    table = Table(title="ftengine plugins")
    for column in ("name", "version", "source", "default", "hooks"):
        table.add_column(column)
    for name, version, source, is_default, hooks in rows:
        hook_text = hooks if isinstance(hooks, str) else ", ".join(h.removeprefix("ftengine_") for h in hooks)
        table.add_row(name, str(version), source, "yes" if is_default else "", hook_text)
    console.print(table)


@cli.command(name="report")
@click.argument("run_dir", type=click.Path())
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="The file to write (default RUN_DIR/report.png); .svg for SVG.",
)
def report_command(run_dir, output):
    """Draw a run's losses, learning rate and before/after metrics from RUN_DIR/metrics.jsonl.

    RUN_DIR is a run's output_dir; 'ftengine run' draws RUN_DIR/report.png itself when
    matplotlib is installed (pip install 'ftengine[report]').
    """
    from .report import draw_report

    console.print(f"report: [bold]{escape(str(draw_report(run_dir, output)))}[/bold]", soft_wrap=True, highlight=False)


cli.add_command(merge)
cli.add_command(generate_command)
cli.add_command(serve_command)


def _register_plugin_commands():
    """Let every available plugin add commands (they show in --help even when not selected)."""
    from .pluginmanager import all_plugins_manager

    pm = all_plugins_manager(warn=warn)
    pm.hook.ftengine_register_commands(cli=cli)


def main():
    _register_plugin_commands()
    if launched_world_size() <= 1:
        cli()
        return
    # A worker of a multi-process run. Its work is done (the group torn down, rank 0's files
    # written and closed) when the command returns; the interpreter's own teardown only stops
    # native thread pools (pyarrow's, gloo's), which now and then aborts a finished worker
    # ("terminate called without an active exception", exit -6) and fails the whole run. So a
    # worker exits without it; faulthandler names the Python frames of any abort before that.
    faulthandler.enable()
    try:
        cli()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # the module torch.distributed.run starts each worker with
    main()
