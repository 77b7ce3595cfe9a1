"""The `descent` command: submit, follow, list, cancel jobs, read their metrics, upload datasets.

Exit codes, for scripts:
  0  done (for `watch` and `submit --watch`: the job succeeded)
  1  the job failed
  2  the job was cancelled (or pruned by its study)
  3  usage or validation error: bad arguments, a spec file that is not a YAML/JSON
     mapping, or the API refused the request (4xx; its message names the field)
  4  no answer from the server, the API key refused (401/403), or the server unavailable (5xx)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

try:  # typer up to 0.2x runs on click; later ones carry their own click, whose errors are TyperExceptions
    from click.exceptions import Abort as ClickAbort
    from click.exceptions import ClickException
except ImportError:
    ClickAbort = ClickException = typer.TyperException  # type: ignore[misc,assignment]

from descent.client import Client, DescentError
from descent.config import ConfigError
from descent.specfile import SpecFileError, load_spec

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
SYSTEM_PREFIX = "system/"  # MLflow's system metrics (CPU, memory, GPU) of the run
EXIT_BY_STATUS = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED, "pruned": EXIT_CANCELLED}
SHOWN_METRICS = ("train_loss", "val_accuracy")  # what a live view and the job list show


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a log): wide enough that job ids are never wrapped.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=width, highlight=False)


out = _console()
err = _console(stderr=True)

app = typer.Typer(
    help="Descent: submit training jobs, follow them, read their metrics.\n\n"
    "Exit codes: 0 ok / job succeeded, 1 job failed, 2 job cancelled, "
    "3 usage or validation error, 4 server unreachable or API key refused.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Output(str, Enum):
    table = "table"
    json = "json"


OutputOption = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts (stdout)")]
JobId = Annotated[str, typer.Argument(help="The job's id.")]


@app.callback()
def connection_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(help="API address (else env DESCENT_URL, the config file, http://127.0.0.1:8000)")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (else env DESCENT_API_KEY, the config file)")] = None,
) -> None:
    """Connection options go before the command: `descent --url URL jobs`."""
    ctx.obj = {"url": url, "api_key": api_key}


def _client(ctx: typer.Context) -> Client:
    options = ctx.find_root().obj or {}
    return Client(url=options.get("url"), api_key=options.get("api_key"))


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _latest(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{name} {_number(metrics.get(name))}" for name in SHOWN_METRICS if metrics.get(name) is not None)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------- following a job


class JobView:
    """A progress bar with the server's ETA and the latest metrics; state changes as lines.

    On a terminal the bar is live; in a pipe or a log the same bar is printed as a text
    line at most once a second, and once more at the end."""

    LINE_INTERVAL_S = 1.0
    BAR_WIDTH = 30

    def __init__(self, console: Console, job_id: str) -> None:
        self.console = console
        self.live = console.is_terminal
        self.job_id = job_id
        self.state = {"epoch": 0, "step": 0, "total_steps": 0, "fraction": 0.0, "eta": "-", "latest": ""}
        self.last_line_at = 0.0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.completed:.0f}/{task.fields[total_steps]}  epoch {task.fields[epoch]}"),
            TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[latest]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.bar.add_task(job_id[:8], total=None, epoch=0, total_steps="?", eta="-", latest="")

    def __enter__(self) -> JobView:
        self.bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bar.stop()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)

    def update(self, progress: dict[str, Any], metrics: dict[str, Any] | None, eta: str | None = None) -> None:
        self.state.update({k: progress[k] for k in ("epoch", "step", "total_steps", "fraction") if k in progress})
        self.state["eta"] = eta if eta is not None else _duration(progress.get("eta_s"))
        if metrics:
            self.state["latest"] = _latest(metrics) or self.state["latest"]
        s = self.state
        self.bar.update(self.task, total=s["total_steps"] or None, completed=s["step"], epoch=s["epoch"],
                        total_steps=s["total_steps"] or "?", eta=s["eta"], latest=s["latest"])  # fmt: skip
        if not self.live and time.monotonic() - self.last_line_at >= self.LINE_INTERVAL_S:
            self.print_bar()

    def print_bar(self) -> None:
        s = self.state
        filled = int(round(self.BAR_WIDTH * min(1.0, s["fraction"] or 0.0)))
        bar = "#" * filled + "-" * (self.BAR_WIDTH - filled)
        self.line(f"[{bar}] {100 * (s['fraction'] or 0.0):5.1f}%  step {s['step']}/{s['total_steps'] or '?'}  "
                  f"epoch {s['epoch']}  ETA {s['eta']}  {s['latest']}".rstrip())  # fmt: skip
        self.last_line_at = time.monotonic()


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    """Show the job's live events until it ends; returns the final state's data."""
    with JobView(out, job_id) as view:
        for event in client.events(job_id):
            kind, data = event["event"], event["data"]
            if kind == "snapshot":
                view.line(f"job {data['id']} ({data['name']}): {data['status']}")
                view.update(data["progress"], data.get("metrics"))
            elif kind == "progress":
                view.update(data, data.get("metrics"))
            elif kind == "state" and data.get("final"):
                view.update(data.get("progress") or {}, data.get("metrics"), eta="0:00:00" if data["status"] == "succeeded" else "-")
                if not view.live:
                    view.print_bar()
                return data
            elif kind == "state":
                detail = f" ({data['detail']})" if data.get("detail") else ""
                view.line(f"{time.strftime('%H:%M:%S')} {data.get('from') or '-'} -> {data['status']}{detail}")
    raise DescentError(None, f"the event stream of job {job_id} ended without its final state")


def _report_final(final: dict[str, Any]) -> int:
    status = final["status"]
    metrics = final.get("metrics") or {}
    summary = "  ".join(f"{k} {_number(v)}" for k, v in metrics.items() if v is not None)
    style = {"succeeded": "green", "failed": "red"}.get(status, "yellow")
    out.print(f"[{style}]{status}[/{style}]" + (f"  {summary}" if summary else ""))
    if final.get("error"):
        err.print(f"[red]{escape(final['error']['type'])}: {escape(final['error']['message'])}[/red]")
    return EXIT_BY_STATUS.get(status, EXIT_FAILED)


def _watch(client: Client, job_id: str, output: Output) -> int:
    if output is Output.json:
        job = client.wait(job_id)
        _print_json(job)
        return EXIT_BY_STATUS.get(job["status"], EXIT_FAILED)
    return _report_final(_follow(client, job_id))


# --------------------------------------------------------------------------- commands


@app.command()
def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A job spec, YAML or JSON (GET /v1/catalog lists the fields).")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job until it ends; exit with its code.")] = False,
    idempotency_key: Annotated[str | None, typer.Option(help="Retrying with the same key returns the same job.")] = None,
    output: OutputOption = Output.table,
) -> None:
    """Submit a job from a spec file."""
    spec = load_spec(file)  # refused here, before anything is sent
    client = _client(ctx)
    job = client.submit(spec, idempotency_key=idempotency_key)
    if output is Output.json and not watch:
        _print_json(job)
        return
    if output is Output.table:
        out.print(f"submitted job {job['id']} ({job['name']}): {job['status']}, {job['progress']['total_steps']} steps")
    if watch:
        raise typer.Exit(_watch(client, job["id"], output))


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="Only jobs in this state (queued, running, succeeded, ...).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    output: OutputOption = Output.table,
) -> None:
    """List jobs, newest first."""
    items = _client(ctx).list(status=status, limit=limit)
    if output is Output.json:
        _print_json(items)
        return
    table = Table("id", "name", "status", "progress", "train_loss", "val_accuracy", "created")
    for job in items:
        metrics = job.get("metrics") or {}
        table.add_row(job["id"], escape(job["name"]), job["status"], f"{100 * job['progress']['fraction']:.0f}%",
                      _number(metrics.get("train_loss")), _number(metrics.get("val_accuracy")),
                      str(job["created_at"])[:19].replace("T", " "))  # fmt: skip
    out.print(table)


def _diagnostic_rows(diagnostics: dict | None) -> dict[str, str]:
    """The end-of-run diagnostics in a line each; nothing for a job that asked for none."""
    rows: dict[str, str] = {}
    hessian = (diagnostics or {}).get("hessian")
    if hessian:
        rows["hessian"] = (f"{hessian['verdict']}  max_eig {hessian['max_eig']:.4g}  min_eig {hessian['min_eig']:.4g}  "
                           f"positive {hessian['positive_fraction']:.0%}  sharpness (max_eig*lr/2) "
                           f"{hessian['sharpness_ratio']:.3g}")  # fmt: skip
    if (diagnostics or {}).get("f1_macro") is not None:
        rows["val_f1_macro"] = _number(diagnostics["f1_macro"])  # type: ignore[index]
    return rows


@app.command()
def show(ctx: typer.Context, job_id: JobId, output: OutputOption = Output.table) -> None:
    """One job: state, progress, latest metrics, MLflow run, error, spec."""
    job = _client(ctx).get(job_id)
    if output is Output.json:
        _print_json(job)
        return
    table = Table(show_header=False, box=None)
    progress = job["progress"]
    rows = {
        "id": job["id"], "name": job["name"], "project": job["project"], "status": job["status"],
        "created": job["created_at"], "started": job["started_at"], "finished": job["finished_at"],
        "attempts": job["attempts"],
        "progress": f"{100 * progress['fraction']:.1f}%  step {progress['step']}/{progress['total_steps']}  "
                    f"epoch {progress['epoch']}",
        **{name: _number(value) for name, value in (job.get("metrics") or {}).items()},
        **_diagnostic_rows(job.get("diagnostics")),
        "mlflow run": (job.get("mlflow") or {}).get("run_url"),
        "error": f"{job['error']['type']}: {job['error']['message']}" if job.get("error") else None,
        "spec": json.dumps(job["spec"], separators=(", ", ": ")),
    }  # fmt: skip
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/bold]", "-" if value is None else escape(str(value)))
    out.print(table)


@app.command()
def watch(ctx: typer.Context, job_id: JobId, output: OutputOption = Output.table) -> None:
    """Follow a job until it ends. Exit code 0 succeeded, 1 failed, 2 cancelled."""
    raise typer.Exit(_watch(_client(ctx), job_id, output))


@app.command()
def cancel(ctx: typer.Context, job_id: JobId, output: OutputOption = Output.table) -> None:
    """Cancel a queued or running job (a running job stops at its next step)."""
    job = _client(ctx).cancel(job_id)
    if output is Output.json:
        _print_json(job)
        return
    out.print(f"job {job['id']}: {job['status']}")


@app.command()
def metrics(
    ctx: typer.Context,
    job_id: JobId,
    metric: Annotated[str | None, typer.Option(help="Only this metric (e.g. train_loss, val_accuracy).")] = None,
    plot: Annotated[bool, typer.Option("--plot", help="A chart in the terminal instead of a table.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """A job's metric histories: rows (metric, step, value), a table by step, or a chart."""
    rows = _client(ctx).metrics(job_id, metric=metric)
    if output is Output.json:
        _print_json(rows)
        return
    if not rows:
        err.print(f"no metrics recorded for job {job_id}" + (f" named {metric}" if metric else "") + " yet")
        return
    series: dict[str, dict[int, float | None]] = defaultdict(dict)
    system = sorted({row["metric"] for row in rows if row["metric"].startswith(SYSTEM_PREFIX)})
    for row in rows:
        if metric or not row["metric"].startswith(SYSTEM_PREFIX):  # the machine's, not the training's
            series[row["metric"]][row["step"]] = row["value"]
    if system and not metric:
        err.print(f"[dim]{len(system)} system metrics not shown "
                  f"(e.g. --metric {system[0]}; all in --output json)[/dim]")  # fmt: skip
    if plot:
        _plot(job_id, series)
        return
    table = Table("step", *series)
    for step in sorted({step for points in series.values() for step in points}):
        table.add_row(str(step), *(_number(points[step]) if step in points else "" for points in series.values()))
    out.print(table)


def _plot(job_id: str, series: dict[str, dict[int, float | None]]) -> None:
    import plotext as plt  # only here: a chart is the one thing that needs it

    colourless = not sys.stdout.isatty()  # no colour codes in a pipe
    lines = {name: [s for s in sorted(points) if points[s] is not None] for name, points in series.items()}
    if hasattr(plt, "plot"):  # plotext 5
        plt.clear_figure()
        if colourless:
            plt.theme("clear")
            plt.plotsize(100, 25)
        for name, steps in lines.items():
            plt.plot(steps, [series[name][s] for s in steps], label=name, marker="braille")
        plt.title(f"job {job_id}")
        plt.xlabel("step")
        plt.show()
        return
    figure = plt.figure  # plotext 6: one figure object
    figure.clear()
    if colourless:
        figure.plot_size(100, 25)
    for name, steps in lines.items():
        figure.draw(figure.signal(steps, [series[name][s] for s in steps]).label(name))
    figure.title(f"job {job_id}")
    figure.label("step", axis="x")
    figure.show(colorless=colourless)


@app.command()
def catalog(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """What can be trained: datasets, models, optimizers, schedules, losses, with their fields."""
    data = _client(ctx).catalog()
    if output is Output.json:
        _print_json(data)
        return
    for section in ("datasets", "models", "optimizers", "schedules"):
        table = Table("name", "fields (default)", "description", title=section, title_justify="left")
        for entry in data.get(section, []):
            fields = ", ".join(f"{name}={field.get('default', '?')}" if "default" in field else name
                               for name, field in entry.get("fields", {}).items())  # fmt: skip
            table.add_row(entry["name"], fields, (entry.get("description") or "").split("\n")[0])
        out.print(table)
    losses = Table("name", "description", title="losses", title_justify="left")
    for entry in data.get("losses", []):
        losses.add_row(entry["name"], entry.get("description") or "")
    out.print(losses)


# --------------------------------------------------------------------------- studies

study_app = typer.Typer(help="Studies: compare optimizers and schedules over seeds, with search and pruning.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(study_app, name="study")
StudyId = Annotated[str, typer.Argument(help="The study's id.")]


def _values_label(values: dict[str, Any]) -> str:
    return ", ".join(f"{path}={json.dumps(v)}" for path, v in values.items()) or "(base spec)"


def _print_study(study: dict[str, Any]) -> None:
    board = study["leaderboard"]
    trials = ", ".join(f"{n} {status}" for status, n in study["trials"].items() if n)
    out.print(f"study {study['id']} ({escape(study['name'])}): [bold]{study['status']}[/bold]  "
              f"{study['configurations_started']}/{study['configurations']} configurations, trials: {trials or 'none'}")  # fmt: skip
    arrow = "higher" if board["direction"] == "max" else "lower"
    target = study["spec"]["objective"].get("target")
    table = Table("rank", "configuration", "seeds", f"{board['metric']} mean", "std",
                  f"steps to {target}" if target is not None else "steps to target", "trials",
                  title=f"leaderboard ({board['metric']}, {arrow} is better)", title_justify="left")  # fmt: skip
    for row in board["configurations"]:
        statuses = " ".join(f"{n} {s}" for s, n in row["statuses"].items())
        table.add_row(str(row["rank"] or "-"), escape(_values_label(row["values"])), str(row["n"]),
                      _number(row["mean"]), _number(row["std"]),
                      "-" if row["steps_to_target"] is None else f"{row['steps_to_target']:.0f} ({row['reached_target']})",
                      statuses)  # fmt: skip
    out.print(table)
    comparison = board.get("comparison")
    if comparison:
        verdict = {True: "[green]larger than the seed-to-seed noise[/green]",
                   False: "[yellow]within the seed-to-seed noise[/yellow]", None: "not testable"}[comparison["lead_exceeds_noise"]]  # fmt: skip
        ci = comparison.get("ci95")
        numbers = (f"Welch t-test p = {comparison['p_value']:.3g}, bootstrap 95% CI [{ci[0]:.4f}, {ci[1]:.4f}]"
                   if comparison["p_value"] is not None and ci else comparison.get("reason") or "")  # fmt: skip
        out.print(f"best vs runner-up: difference {comparison['difference']:+.4f}: {verdict} ({numbers})")
    if study.get("lr_range_test"):
        reading = study["lr_range_test"]
        if reading.get("suggested_lr"):
            low, high = reading["bounds"]
            out.print(f"lr range test: suggested lr {reading['suggested_lr']:.3g} (lowest loss at {reading['min_loss_lr']:.3g}); "
                      f"a search could use [{low:.3g}, {high:.3g}]")  # fmt: skip
        else:
            out.print(f"lr range test: {reading.get('reason')}")
    if study.get("registered_model") and study["registered_model"].get("version"):
        model = study["registered_model"]
        out.print(f"best model: registered as {model['name']} version {model['version']} (alias @{model['alias']})")
    if study["mlflow"].get("run_url"):
        out.print(f"MLflow: {study['mlflow']['run_url']}")


STUDY_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}


def _watch_study(client: Client, study_id: str, output: Output) -> int:
    if output is Output.json:
        study = client.wait_study(study_id)
        _print_json(study)
        return STUDY_EXIT.get(study["status"], EXIT_FAILED)
    for event in client.study_events(study_id):
        kind, data = event["event"], event["data"]
        if kind == "snapshot":
            out.print(f"study {data['id']} ({escape(data['name'])}): {data['status']}, {data['configurations']} configurations")
        elif kind == "trial":
            out.print(f"{time.strftime('%H:%M:%S')} trial {data['job_id'][:8]}: {data.get('from') or '-'} -> {data['status']}",
                      markup=False)  # fmt: skip
        elif kind == "trials":
            out.print(" ".join(f"{n} {s}" for s, n in data["trials"].items() if n), markup=False)
        elif kind == "state" and data.get("final"):
            break
    study = client.study(study_id)
    _print_study(study)
    return STUDY_EXIT.get(study["status"], EXIT_FAILED)


@study_app.command("submit")
def study_submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A study spec, YAML or JSON (see examples/studies/).")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the study until it ends.")] = False,
    output: OutputOption = Output.table,
) -> None:
    """Submit a study from a spec file."""
    spec = load_spec(file)
    client = _client(ctx)
    study = client.submit_study(spec)
    if output is Output.json and not watch:
        _print_json(study)
        return
    if output is Output.table:
        out.print(f"submitted study {study['id']} ({escape(study['name'])}): {study['configurations']} configurations "
                  f"x {study['spec']['repeats']} seeds")  # fmt: skip
    if watch:
        raise typer.Exit(_watch_study(client, study["id"], output))


@study_app.command("show")
def study_show(ctx: typer.Context, study_id: StudyId, output: OutputOption = Output.table) -> None:
    """A study's state and leaderboard: mean and std over seeds, and whether the lead is real."""
    study = _client(ctx).study(study_id)
    if output is Output.json:
        _print_json(study)
        return
    _print_study(study)


@study_app.command("watch")
def study_watch(ctx: typer.Context, study_id: StudyId, output: OutputOption = Output.table) -> None:
    """Follow a study's trials until it ends, then show its leaderboard. Exit code 0 succeeded, 1 failed, 2 cancelled."""
    raise typer.Exit(_watch_study(_client(ctx), study_id, output))


@study_app.command("list")
def study_list(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=100)] = 20, output: OutputOption = Output.table
) -> None:
    """Studies, newest first."""
    items = _client(ctx).studies(limit=limit)
    if output is Output.json:
        _print_json(items)
        return
    table = Table("id", "name", "status", "method", "configurations", "trials", "best", "created")
    for study in items:
        best = next((r for r in study["leaderboard"]["configurations"] if r["rank"] == 1), None)
        trials = " ".join(f"{n} {s}" for s, n in study["trials"].items() if n)
        table.add_row(study["id"], escape(study["name"]), study["status"], study["spec"]["search"]["method"],
                      f"{study['configurations_started']}/{study['configurations']}", trials,
                      escape(_values_label(best["values"])) + f" {_number(best['mean'])}" if best else "-",
                      str(study["created_at"])[:19].replace("T", " "))  # fmt: skip
    out.print(table)


@study_app.command("cancel")
def study_cancel(ctx: typer.Context, study_id: StudyId, output: OutputOption = Output.table) -> None:
    """Cancel a study and every trial still queued or running."""
    study = _client(ctx).cancel_study(study_id)
    if output is Output.json:
        _print_json(study)
        return
    out.print(f"study {study['id']}: {study['status']}")


# --------------------------------------------------------------------------- datasets

datasets_app = typer.Typer(help="Your own data: upload, list, show, delete datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
DatasetId = Annotated[str, typer.Argument(help="The dataset's id.")]


def _shape(dataset: dict[str, Any]) -> str:
    return "x".join(str(d) for d in dataset["shape"])


def _dataset_table(dataset: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    classes = dataset["classes"]
    rows = {
        "id": dataset["id"], "name": dataset["name"], "project": dataset["project"], "format": dataset["format"],
        "label": dataset.get("label"), "rows": dataset["n_rows"], "shape": _shape(dataset),
        "classes": f"{len(classes)}: " + ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else ""),
        "features": ", ".join(dataset["feature_names"]) if dataset.get("feature_names") else None,
        "size": f"{dataset['size_bytes']:,} bytes", "sha256": dataset["sha256"], "created": dataset["created_at"],
    }  # fmt: skip
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/bold]", "-" if value is None else escape(str(value)))
    return table


@datasets_app.command("upload")
def datasets_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV, Parquet (with --label) or NPZ (X, y).")],
    label: Annotated[str | None, typer.Option(help="The label column (CSV, Parquet).")] = None,
    name: Annotated[str | None, typer.Option(help="A name for people; default: the file's name.")] = None,
    output: OutputOption = Output.table,
) -> None:
    """Upload a dataset; jobs then use it as `dataset: {id: ...}`. The same file again is the same dataset."""
    dataset = _client(ctx).upload_dataset(file, label=label, name=name)
    if output is Output.json:
        _print_json(dataset)
        return
    out.print(f"dataset {dataset['id']} ({escape(dataset['name'])}): {dataset['n_rows']} rows of {_shape(dataset)}, "
              f"{dataset['n_classes']} classes")  # fmt: skip


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, output: OutputOption = Output.table) -> None:
    """Your project's datasets, newest first."""
    items = _client(ctx).datasets()
    if output is Output.json:
        _print_json(items)
        return
    table = Table("id", "name", "format", "rows", "shape", "classes", "created")
    for d in items:
        table.add_row(d["id"], escape(d["name"]), d["format"], str(d["n_rows"]), _shape(d), str(d["n_classes"]),
                      str(d["created_at"])[:19].replace("T", " "))  # fmt: skip
    out.print(table)


@datasets_app.command("show")
def datasets_show(ctx: typer.Context, dataset_id: DatasetId, output: OutputOption = Output.table) -> None:
    """One dataset: rows, shape, classes, features, digest."""
    dataset = _client(ctx).dataset(dataset_id)
    if output is Output.json:
        _print_json(dataset)
        return
    out.print(_dataset_table(dataset))


@datasets_app.command("delete")
def datasets_delete(ctx: typer.Context, dataset_id: DatasetId) -> None:
    """Delete a dataset (refused while a queued or running job uses it)."""
    _client(ctx).delete_dataset(dataset_id)
    out.print(f"deleted dataset {dataset_id}")


# --------------------------------------------------------------------------- entry point


def exit_code_for(error: DescentError) -> int:
    if error.status is None or error.status in (401, 403) or error.status >= 500:
        return EXIT_UNREACHABLE
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> None:
    try:
        # standalone_mode=False: click's own exit code for usage errors is 2, which here means "cancelled".
        code = app(args=argv, prog_name="descent", standalone_mode=False)
    except (ClickAbort, typer.Abort):
        err.print("aborted")
        code = 130
    except (ClickException, typer.TyperException) as exc:  # bad arguments or options
        show = getattr(exc, "show", None)
        show() if show else err.print(f"error: {escape(str(exc))}")
        code = EXIT_USAGE
    except (SpecFileError, ConfigError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        code = EXIT_USAGE
    except DescentError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}" + (f" (HTTP {exc.status})" if exc.status else ""))
        if exc.status == 401:
            err.print("set the key with --api-key or DESCENT_API_KEY, or in ~/.config/descent/config.toml")
        code = exit_code_for(exc)
    except TimeoutError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        code = EXIT_UNREACHABLE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
