"""The ``ftengine`` command line: ``run``, ``plugins``, plus commands plugins register."""

import json
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import FtengineError
from .inference import generate_command, merge
from .server import serve_command

console = Console()
err_console = Console(stderr=True)


class FtengineGroup(click.Group):
    """Prints ftengine's own errors as messages, not tracebacks, and exits with status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FtengineError as exc:
            # Escaped: messages quote user text and names like ftengine[serve], not rich markup.
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            sys.exit(2)


@click.group(cls=FtengineGroup)
@click.version_option(__version__, prog_name="ftengine")
def cli():
    """ftengine: fine-tune pre-trained language models with plugins.

    Run 'ftengine run' with no arguments for the embedded default job: fine-tune
    SmolLM2-135M-Instruct on the bundled contact-extraction task and show before/after.
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
    "--eval-before/--no-eval-before", default=None, help="Also evaluate before training (default: on for the default job)."
)
def run(config_file, plugins, overrides, resume, eval_before):
    """Train: CONFIG_FILE (YAML) plus --plugin and -o overrides.

    With neither CONFIG_FILE nor --plugin, runs the embedded default job (overrides apply on
    top of it, e.g. -o train.max_steps=10).
    """
    from .build import configure
    from .default_job import default_job_config
    from .loop import train

    default_job = config_file is None and not plugins
    base = default_job_config() if default_job else None
    config, pm = configure(config_file, plugins, overrides, base=base)
    if eval_before is None:
        eval_before = default_job
    summary = train(config, pm, resume=resume, eval_before=eval_before)
    print_summary(summary)


def print_summary(summary):
    """Before/after table of the evaluation metrics, and where the result was saved."""
    before, after = summary.get("before") or {}, summary.get("after") or {}
    keys = [k for k in after if k.startswith("eval_")]
    if keys:
        table = Table(title="evaluation", show_lines=False)
        table.add_column("metric")
        if before:
            table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key in keys:
            row = [key.removeprefix("eval_")]
            if before:
                row.append(_fmt(before.get(key)))
            row.append(_fmt(after[key]))
            table.add_row(*row)
        console.print(table)
    data = summary.get("data", {}).get("train", {})
    if data.get("truncated"):
        console.print(f"{data['truncated']} training sequences were truncated to train.max_length ({data['dropped']} dropped)")
    console.print(f"saved: [bold]{summary['saved']}[/bold]  (metrics: {summary['output_dir']}/metrics.jsonl)")


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


cli.add_command(merge)
cli.add_command(generate_command)
cli.add_command(serve_command)


def _register_plugin_commands():
    """Let every available plugin add commands (they show in --help even when not selected)."""
    from .pluginmanager import all_plugins_manager

    pm = all_plugins_manager(warn=lambda message: err_console.print(f"[yellow]warning:[/yellow] {message}", highlight=False))
    pm.hook.ftengine_register_commands(cli=cli)


def main():
    _register_plugin_commands()
    cli()
