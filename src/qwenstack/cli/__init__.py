"""The `qwenstack` command: a thin layer that turns flags into Settings and calls the parts.

One module per command group; this one only puts them together, in the order `--help` lists them.
"""

from __future__ import annotations

import typer

from qwenstack.cli import bench, kb, keys, plan, serve, users
from qwenstack.cli.common import LogFormatOpt, use_log_format

app = typer.Typer(
    help="Self-hosted Qwen3 on vLLM behind an OpenAI-compatible gateway.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(log_format: LogFormatOpt = None) -> None:
    """Self-hosted Qwen3 on vLLM behind an OpenAI-compatible gateway."""
    use_log_format(log_format)


app.command("up", context_settings=serve.PASS_EXTRA_ARGS)(serve.up)
app.command("engine", context_settings=serve.PASS_EXTRA_ARGS)(serve.engine)
app.command()(serve.gateway)
app.command()(serve.config)
app.command("test-model")(serve.test_model)
app.add_typer(keys.app, name="keys")
app.command()(keys.usage)
app.add_typer(kb.app, name="kb")
app.command()(bench.bench)
app.command(help=plan.HELP)(plan.plan)
app.command()(serve.ui)
app.add_typer(users.app, name="users")

__all__ = ["app"]
