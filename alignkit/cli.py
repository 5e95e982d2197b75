"""One entry point: `alignkit <command> [CONFIG.yaml] [key=value ...]`."""

from __future__ import annotations

import json
import os
import sys

from alignkit.commands import COMMANDS
from alignkit.config.load import ConfigError, describe, load_config
from alignkit.training.alarms import AlarmStop

USAGE = "usage: alignkit <command> [CONFIG.yaml] [key=value ...]\n       alignkit <command> --help"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the command's config and run it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = COMMANDS
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE + "\n\ncommands:")
        width = max(map(len, commands))
        for name, cmd in commands.items():
            print(f"  {name:<{width}} {cmd.summary}")
        print("\nSettings come from an optional YAML file, then key=value overrides (dotted for sections).")
        return 0
    name, args = argv[0], argv[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, commands, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"alignkit: unknown command '{name}'.{hint}\n{USAGE}", file=sys.stderr)
        return 2
    cmd = commands[name]
    many = cmd.positional and isinstance(getattr(cmd.config_class(), cmd.positional), list)
    if any(a in ("-h", "--help") for a in args):
        shape = f"{cmd.positional.upper()}{'...' if many else ''}" if cmd.positional else "[CONFIG.yaml]"
        print(f"usage: alignkit {name} {shape} [key=value ...]\n\n{cmd.summary}\n\nfields:")
        print(describe(cmd.config_class))
        return 0
    path = None
    if cmd.positional:  # alignkit report RUN_DIR [RUN_DIR ...] / alignkit vllm-serve MODEL [key=value ...]
        bare = [a for a in args if "=" not in a]
        if len(bare) > 1 and not many:
            print(f"alignkit {name}: takes one {cmd.positional.upper()}, got {bare}", file=sys.stderr)
            return 2
        filled = [f"{cmd.positional}={json.dumps(bare if many else bare[0])}"] if bare else []
        args = [a for a in args if "=" in a] + filled
    elif args and "=" not in args[0]:
        path, args = args[0], args[1:]
    try:
        cfg = load_config(cmd.config_class, path, args)
    except ConfigError as e:
        print(f"alignkit {name}: {e}", file=sys.stderr)
        return 2
    try:
        cmd.run(cfg)
    except AlarmStop as e:  # alarms.stop_on_alarm: the step is saved and the report written
        print(f"alignkit {name}: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as e:
        # Data, config and file problems (a model folder or hub name that is not there) carry their own
        # actionable message (file:line, field, path); no traceback.
        print(f"alignkit {name}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from alignkit.training.loop import RunInterrupted

        if not isinstance(e, RunInterrupted):  # Ctrl-C before training started (a loop says what it saved)
            print(f"\nalignkit {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        end_process_group()
    return 0


def end_process_group() -> None:
    """Leave the process group of a launched run (torchrun, accelerate launch: WORLD_SIZE > 1) before the
    interpreter exits: a gloo group left to be torn down at exit can abort the process ("terminate called
    without an active exception") after the run itself succeeded. A group in a single process is left alone:
    a colocated vLLM engine kept for a later run in the same process (a notebook, the tests) holds one."""
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    vllm = sys.modules.get("alignkit.generation.vllm")  # (not imported here where no run used it)
    if vllm is not None and vllm.engines_built():
        return  # vLLM's shutdown at exit destroys the groups; destroying them first makes it fail loudly
    if launched and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
