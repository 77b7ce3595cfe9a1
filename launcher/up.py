"""`make up`: the whole stack in the foreground, kept running until Ctrl-C or SIGTERM.

A child that dies (the OOM killer, a segfault, a SIGKILL) is started again after a
pause that grows while it keeps dying, as compose's `restart: unless-stopped` does;
the others keep running. A stop (SIGTERM, SIGINT, SIGHUP) ends every child within
10 s: SIGTERM to all, SIGKILL to what is left after processes.STOP_GRACE_S; a second
signal kills at once. Whatever happens to this process, even a SIGKILL, its children
go with it (launcher/orphan_guard.py). supervisord, circus and honcho were weighed
and not taken: none kills its children when it is itself SIGKILLed, supervisord
gives a child up for good after a few quick deaths, honcho stops everything when one
child dies (as this did before).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from datetime import datetime

from jobs.pool_names import POOL_NAME_PATTERN
from jobs.settings import settings
from launcher.processes import ProcessGroup, StopRequested
from launcher.stack import local_api_key, stack_env, start_stack

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SUPERVISE_INTERVAL_S = 0.5


def say(message: str) -> None:
    print(f"[make up {datetime.now().strftime('%H:%M:%S.%f')[:-3]}] {message}", flush=True)


def worker_pools(raw: str) -> list[str]:
    """`--worker-pools cpu,gpu` -> ["cpu", "gpu"]: one worker per name, in that pool."""
    pools = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [p for p in pools if not re.match(POOL_NAME_PATTERN, p)]
    if not pools or bad:
        raise argparse.ArgumentTypeError(f"pool names are lower-case letters, digits and '-': {bad or raw!r}")
    return pools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make up", description="The whole stack in the foreground.")
    parser.add_argument("--worker-pools", type=worker_pools, default=None, metavar="POOL,POOL",
                        help="one worker per pool named (default: one worker of WORKER_POOL)")  # fmt: skip
    args = parser.parse_args(argv)
    log_dir = settings.descent_home.resolve() / "logs"
    group = ProcessGroup(log_dir=log_dir, env=stack_env(settings))
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: group.request_stop())
    try:
        say("starting Descent (MLflow server, API, worker, reaper)...")
        start_stack(settings, log_dir, group=group, worker_pools=args.worker_pools)
        api = f"http://127.0.0.1:{settings.api_port}"
        key = local_api_key(settings)
        print(f"\n  API        {api}   (docs: {api}/docs)")
        print(f"  API key    {key}   (server admin; also in {settings.descent_home.resolve() / 'api-key'})")
        print(f"             curl -H 'Authorization: Bearer {key}' {api}/v1/jobs")
        print(f"  MLflow UI  {settings.mlflow_ui_url}")
        print(f"  logs       {log_dir}/\n\nCtrl-C stops everything (a second Ctrl-C at once).", flush=True)
        while not group.stop_requested:
            for event in group.restart_dead():
                say(event)
            time.sleep(SUPERVISE_INTERVAL_S)
    except StopRequested:
        pass
    finally:
        say("stopping (a second Ctrl-C or SIGTERM kills at once)...")
        killed = group.stop_all()
        say("stopped" + (f" ({', '.join(killed)} still running, killed)" if killed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
