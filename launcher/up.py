"""`make up`: the whole stack in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import time

from jobs.settings import settings
from launcher.stack import local_api_key, start_stack


def main() -> None:
    log_dir = settings.descent_home.resolve() / "logs"
    print("Starting Descent (MLflow server, API, worker)...", flush=True)
    group = start_stack(settings, log_dir)
    api = f"http://127.0.0.1:{settings.api_port}"
    key = local_api_key(settings)
    print(f"\n  API        {api}   (docs: {api}/docs)")
    print(f"  API key    {key}   (server admin; also in {settings.descent_home.resolve() / 'api-key'})")
    print(f"             curl -H 'Authorization: Bearer {key}' {api}/v1/jobs")
    print(f"  MLflow UI  {settings.mlflow_ui_url}")
    print(f"  logs       {log_dir}/\n\nCtrl-C stops everything.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            group.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
    finally:
        group.stop_all()


if __name__ == "__main__":
    main()
