"""Before each request it sends, MLflow's client asks whether this process runs on Databricks
(a notebook, a job, a cluster) to add their ids as headers. Off Databricks every answer is a
few imports that fail (IPython, pyspark, dbruntime), and Python does not remember a failed
import: it searches sys.path again, each time. Measured here: ~0.7 ms of CPU a request, about
twenty requests a job, and the import lock taken by every thread sending one (the end of a job
sends its files from several threads at once). A process does not move onto Databricks: it is
asked once, and a process that is not there stops asking."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_asked = False
_lock = threading.Lock()  # tracking clients are made in many threads at once (the API's)


def ask_databricks_once() -> None:
    """Drop MLflow's Databricks request-header provider when it says this process is not on
    Databricks. Its registry is MLflow's internal list; if that changes shape, nothing is done."""
    global _asked
    if _asked:
        return
    with _lock:
        if _asked:
            return
        from mlflow.tracking.request_header import registry
        from mlflow.tracking.request_header.databricks_request_header_provider import (
            DatabricksRequestHeaderProvider,
        )

        providers = getattr(registry._request_header_provider_registry, "_registry", None)
        if not isinstance(providers, list):
            log.debug("MLflow's request-header registry changed shape; its Databricks check stays per request")
        else:
            for provider in list(providers):
                if type(provider) is DatabricksRequestHeaderProvider and not provider.in_context():
                    providers.remove(provider)
        _asked = True
