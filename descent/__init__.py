"""Descent's user side: a Python client (`descent.Client`) and the `descent` command.

A pure HTTP client of the /v1 API: it imports nothing from the server's packages and
no torch, so that it installs on a laptop with httpx alone (the CLI adds typer, rich
and plotext)."""

from descent.client import Client, DescentError

__all__ = ["Client", "DescentError"]
