"""The ``timfusion`` command: ``timfusion <command> [key=value ...]`` (Hydra overrides).

``timfusion --help`` lists the commands; ``timfusion <command> --help`` prints the
command's composed configuration and the choices of its config groups. Bad input ends
with one line on stderr naming the file or key, and exit status 2.
"""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

from timfusion.platform.errors import UserError


def _usage(commands: dict) -> str:
    width = max(len(n) for n in commands)
    lines = ["usage: timfusion <command> [key=value ...] [--help]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in commands.items()]
    lines += ["", "Overrides are Hydra's: task=medical, data.root=DIR, metrics=[EN,MI]. "
              "`timfusion <command> --help` shows its configuration."]
    return "\n".join(lines)


def _help(cmd, cfg) -> str:
    from timfusion.platform.config import group_options

    groups = {g: group_options(g) for g in ("task", "cluster") if group_options(g)}
    lines = [f"timfusion {cmd.name}: {cmd.summary}", "", "configuration (defaults):", OmegaConf.to_yaml(cfg)]
    lines += ["config groups:"] + [f"  {g}: {', '.join(opts)}" for g, opts in groups.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``timfusion`` console script."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = list(sys.argv[1:] if argv is None else argv)
    from timfusion.platform.config import compose
    from timfusion.platform.jobs import COMMANDS, load_all

    load_all()
    commands = dict(COMMANDS.items())
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(commands))
        return 0
    name = args.pop(0)
    groups = {n.split(" ")[0] for n in commands if " " in n}
    if name in groups:
        actions = sorted(n.split(" ", 1)[1] for n in commands if n.startswith(name + " "))
        if not args or args[0] in ("-h", "--help"):
            print(f"usage: timfusion {name} <{'|'.join(actions)}> [key=value ...]")
            return 0 if args else 2
        action = args.pop(0)
        if f"{name} {action}" not in commands:
            print(f"timfusion: error: unknown action {name} {action!r}; valid: {', '.join(actions)}",
                  file=sys.stderr)
            return 2
        name = f"{name} {action}"
    if name not in commands:
        print(f"timfusion: error: unknown command {name!r}; valid: {', '.join(commands)}", file=sys.stderr)
        return 2
    cmd = commands[name]
    want_help = any(a in ("-h", "--help") for a in args)
    overrides = [a for a in args if a not in ("-h", "--help")]
    try:
        cfg = compose(cmd.config, overrides)
        if want_help:
            print(_help(cmd, cfg))
            return 0
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise UserError(f"{missing[0]}: required (pass {missing[0]}=...)")
        cmd.run(cfg)
    except UserError as err:
        from timfusion.platform.storage import redact

        print(f"timfusion {name}: error: {redact(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"timfusion {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
