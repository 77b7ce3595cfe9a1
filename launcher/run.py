"""Run one part of Descent in the foreground: `python -m launcher.run api|worker|mlflow|reaper|migrate`.

`make api`, `make worker` and `make mlflow` use it, to add parts (say, more workers)
to a running stack; settings come from the environment as everywhere else.
"""

from __future__ import annotations

import os
import sys

from jobs.settings import settings
from launcher.processes import api_command, migrate_command, mlflow_command, reaper_command, worker_command
from launcher.stack import stack_env

COMMANDS = {
    "api": lambda: api_command(settings),
    "worker": lambda: worker_command(settings, int(os.environ.get("WORKER_CONCURRENCY", "1")),
                                     name=os.environ.get("WORKER_NAME", f"worker-{os.getpid()}")),
    "mlflow": lambda: mlflow_command(settings),
    "reaper": reaper_command,
    "migrate": migrate_command,
}  # fmt: skip


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m launcher.run {{{'|'.join(COMMANDS)}}}")
    settings.ensure_home()
    command = COMMANDS[sys.argv[1]]()
    os.execve(command[0], command, stack_env(settings))


if __name__ == "__main__":
    main()
