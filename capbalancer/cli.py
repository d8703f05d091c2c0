"""The `capbalancer` command: a click group whose subcommands live beside the code they drive.

Subcommands are imported only when invoked, so `capbalancer --help` stays fast and a module's
heavy imports (numpy, aiohttp) cost nothing to the commands that do not need them.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" of a click.Command
SUBCOMMANDS: dict[str, str] = {
    "serve": "capbalancer.server.commands:serve",
    "check-config": "capbalancer.server.commands:check_config",
    "sim": "capbalancer.sim.commands:sim",
    "des": "capbalancer.sim.commands:des",
    "loadtest": "capbalancer.loadtest.commands:loadtest",
    "demo": "capbalancer.loadtest.demo:demo",
    "profile": "capbalancer.profiling.commands:profile",
    "plan": "capbalancer.planning.commands:plan",
    "deploy": "capbalancer.planning.commands:deploy",
}

_SHORT_HELP: dict[str, str] = {
    "serve": "Run the proxy in front of a fleet (or an embedded simulated one).",
    "check-config": "Validate a config file without starting anything.",
    "sim": "Serve simulated vLLM/TGI/SGLang instances.",
    "des": "Evaluate a policy on a simulated cluster on a virtual clock.",
    "loadtest": "Load-test an OpenAI-compatible or TGI endpoint.",
    "demo": "Compare round_robin and capacity on a simulated cluster.",
    "profile": "Profile a live engine instance into a profile file.",
    "plan": "Choose TP and instances per machine for a cluster.",
    "deploy": "Render or start the instances of a plan.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("capbalancer"):
                return _unavailable(cmd_name, str(exc))
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _SHORT_HELP.get(name, "")) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str, why: str) -> click.Command:
    @click.command(name=name, help=f"(not available in this build: {why})")
    def _cmd() -> None:
        raise click.ClickException(f"'{name}' is not available in this build: {why}")

    return _cmd


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The package's version and which build of the scheduling core loads (capbalancer/sched/__init__.py)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    from capbalancer import __version__
    from capbalancer.sched import BUILD

    try:
        installed = version("capbalancer")
    except PackageNotFoundError:
        installed = __version__
    click.echo(f"{ctx.find_root().info_name}, version {installed}; scheduling core: {BUILD}")
    ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version (and whether the scheduling core runs compiled) and exit.")
def main() -> None:
    """capbalancer: capacity-aware load balancing for LLM engines on unequal GPUs."""


if __name__ == "__main__":
    main()
