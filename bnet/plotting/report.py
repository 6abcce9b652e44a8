"""One page that summarises a study (``bnet report``): Optuna's views of the search and the
best run's own figures, from the Optuna storage and the MLflow store.

The page is one self-contained HTML file (figures embedded as PNG), or a PNG of the summary
figure alone; both are also logged on the study's parent run (``report/``).
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from bnet.errors import ConfigError  # noqa: E402
from bnet.tracking import conventions as tags  # noqa: E402
from bnet.tracking.store import Store, connect  # noqa: E402
from bnet.tuning.warm_start import own_trials  # noqa: E402

if TYPE_CHECKING:
    from bnet.tuning.trivial import TrivialComparison

REPORT_DIR = "report"
TOP_TRIALS = 10


@dataclass
class Report:
    """A written report."""

    path: Path
    parent_run_id: str
    n_figures: int
    notes: list[str]
    trivial: "TrivialComparison | None" = None  # the best run against its family's trivial answer


def load_study(name: str, store: Store):
    import optuna

    from bnet.tracking.secrets import redact

    try:
        return optuna.load_study(study_name=name, storage=store.optuna_storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store.optuna_storage)
                 if "#" not in s.study_name]
        raise ConfigError(f"no study '{name}' in {redact(store.optuna_storage)} "
                          f"(has {', '.join(names) or 'none'})") from None


def summary_figure(study, metric: str, direction: str):
    """Every finished trial's value in order and the best so far (the study at a glance); for a
    multi-objective study, :func:`pareto_figure`."""
    from optuna.trial import TrialState

    if len(study.directions) > 1:
        return pareto_figure(study)
    trials = own_trials(study, (TrialState.COMPLETE,))
    figure, ax = plt.subplots(figsize=(6, 3.5))
    if trials:
        values = [t.values[0] for t in trials]
        best = [min(values[: i + 1]) if direction == "minimize" else max(values[: i + 1]) for i in range(len(values))]
        numbers = [t.number for t in trials]
        ax.plot(numbers, values, "o", label="trial", alpha=0.7)
        ax.plot(numbers, best, "-", label="best so far")
        ax.legend(frameon=False)
    pruned = len(own_trials(study, (TrialState.PRUNED,)))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=metric, title=f"study '{study.study_name}': {len(trials)} complete, {pruned} pruned "
                                                f"({direction} {metric})")
    figure.tight_layout()
    return figure


def pareto_figure(study):
    """A multi-objective study's trials, its first objective against each other one: the
    Pareto front in red, each trial numbered, and the best trial by the first objective alone
    (what a study of that objective, e.g. a stage-wise AE study, would pick) ringed."""
    from optuna.trial import TrialState

    from bnet.tuning.study import front_of

    trials = own_trials(study, (TrialState.COMPLETE,))
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    directions = [d.name.lower() for d in study.directions]
    front = {t.number for t in front_of(trials, directions)}
    others = range(1, len(directions))
    figure, axes = plt.subplots(1, len(others), figsize=(4.6 * len(others), 3.8), squeeze=False)
    first = min(trials, key=lambda t: t.values[0] * (1 if directions[0] == "minimize" else -1)) if trials else None
    for ax, i in zip(axes[0], others):
        for t in trials:
            on_front = t.number in front
            ax.scatter(t.values[0], t.values[i], color="tab:red" if on_front else "0.6", zorder=3 if on_front else 2)
            ax.annotate(str(t.number), (t.values[0], t.values[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if first is not None:
            ax.scatter(first.values[0], first.values[i], s=160, facecolors="none", edgecolors="black", zorder=4,
                       label=f"best {names[0]} alone (trial {first.number})")
            ax.legend(fontsize=7, frameon=False)
        ax.set(xlabel=f"{names[0]} ({directions[0]})", ylabel=f"{names[i]} ({directions[i]})")
    figure.suptitle(f"study '{study.study_name}': {len(trials)} complete, Pareto front in red ({len(front)} trials)")
    figure.tight_layout()
    return figure


def _optuna_figures(study, metric: str, notes: list[str]) -> list[tuple[str, object]]:
    """Optuna's matplotlib views; a view that needs more trials or parameters is left out, and said."""
    from optuna.visualization import matplotlib as views

    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    wanted = [("optimisation history", lambda: views.plot_optimization_history(study, target=target,
                                                                               target_name=metric)),
              ("parameter importances", lambda: views.plot_param_importances(study, target=target,
                                                                             target_name=metric)),
              ("parallel coordinates", lambda: views.plot_parallel_coordinate(study, target=target,
                                                                              target_name=metric))]
    if multi:
        wanted.append(("Pareto front", lambda: views.plot_pareto_front(study)))
    figures = []
    for title, draw in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks these views experimental
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            notes.append(f"{title}: not drawn ({str(err).splitlines()[0]})")
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(7, 4)
        figures.append((title, figure))
    return figures


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _best_run_plots(client, run_id: str, notes: list[str]) -> list[tuple[str, bytes]]:
    # a trial answered by another study's fit shows that fit's figures
    run = client.get_run(run_id)
    run_id = run.data.tags.get(tags.TAG_REUSED_RUN, run_id)
    # a pipeline trial's figures are its stages' (runs nested under it)
    stages = client.search_runs([run.info.experiment_id], max_results=20,
                                filter_string=f"tags.`{tags.TAG_PIPELINE_RUN}` = '{run_id}'")
    sources = [(run_id, "")] + [(stage.info.run_id, f"{stage.data.tags.get(tags.TAG_STAGE, '')}: ") for stage in stages]
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, prefix in sources:
            for artifact in client.list_artifacts(source, tags.PLOTS_DIR):
                if artifact.path.endswith(".png"):
                    local = client.download_artifacts(source, artifact.path, tmp)
                    images.append((prefix + Path(artifact.path).stem.replace("_", " "), Path(local).read_bytes()))
    if not images:
        notes.append(f"the best run {run_id} logged no figures")
    return images


def _trivial_comparison(family: str | None, run):
    """How the best run compares with its family's trivial answer (None where unknown)."""
    from bnet.tuning.family import family_names, get_family

    return get_family(family).trivial(run.data.metrics) if family in family_names() else None


def write_report(study_name: str, store: Store, out: str | Path | None = None, log: bool = True) -> Report:
    """Write the report of ``study_name`` to ``out`` (``.html``, or ``.png`` for the summary
    figure alone; default ``report-<study>.html``) and log it on the study's parent run."""
    from optuna.trial import TrialState

    from bnet.tuning.recovery import PARENT_RUN_ATTR
    from bnet.tuning.study import MLFLOW_RUN_ATTR

    study = load_study(study_name, store)
    parent_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if not parent_id:
        raise ConfigError(f"study '{study_name}' was not run by bnet tune (no parent run recorded)")
    client = connect(store)
    parent = client.get_run(parent_id)
    metric = parent.data.tags.get(tags.TAG_OBJECTIVE, "value")
    direction = parent.data.tags.get(tags.TAG_DIRECTION, "minimize")
    out = Path(out or f"report-{study_name}.html")
    if out.suffix not in (".html", ".png"):
        raise ConfigError(f"{out}: a report is .html (the whole page) or .png (the summary figure)")
    notes: list[str] = []
    comparison = None
    summary = _png(summary_figure(study, metric, direction))
    complete = own_trials(study, (TrialState.COMPLETE,))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        out.write_bytes(summary)
        n_figures = 1
    else:
        sections = [("study summary", summary)]
        sections += [(title, _png(figure)) for title, figure in _optuna_figures(study, metric, notes)] \
            if complete else []
        best_run = parent.data.tags.get("bnet.best_run_id")
        if best_run:
            sections += [(f"best run: {title}", image) for title, image in _best_run_plots(client, best_run, notes)]
            comparison = _trivial_comparison(parent.data.tags.get(tags.TAG_FAMILY), client.get_run(best_run))
        ranked = sorted(complete, key=lambda t: t.values[0], reverse=direction == "maximize")[:TOP_TRIALS]
        out.write_text(_page(study_name, parent, metric, direction, ranked, sections, notes, MLFLOW_RUN_ATTR,
                             comparison, study.metric_names))
        n_figures = len(sections)
    if log:
        client.log_artifact(parent_id, str(out), REPORT_DIR)
    return Report(out, parent_id, n_figures, notes, comparison)


def _page(study_name, parent, metric, direction, ranked, sections, notes, run_attr, comparison=None,
          metric_names: list[str] | None = None) -> str:
    escape = html.escape
    metric_names = metric_names or [metric]
    rows = "".join(
        f"<tr><td>{t.number}</td>{''.join(f'<td>{v:.6g}</td>' for v in t.values)}"
        f"<td><code>{escape(t.user_attrs.get(run_attr, ''))}</code>"
        f"</td><td>{escape(', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in t.params.items()))}"
        f"</td></tr>" for t in ranked)
    figures = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(image).decode()}' "
                      f"alt='{escape(title)}'><figcaption>{escape(title)}</figcaption></figure>"
                      for title, image in sections)
    tagged = parent.data.tags
    facts = [("experiment", parent.info.experiment_id), ("parent run", parent.info.run_id),
             ("objective", f"{direction} {metric}"), ("data", tagged.get(tags.TAG_DATA_PATH, "")),
             ("best run", tagged.get("bnet.best_run_id", "none yet"))]
    if comparison is not None:
        facts.append(("against the trivial answer", comparison.figure))
    facts_html = "".join(f"<tr><th>{escape(k)}</th><td><code>{escape(str(v))}</code></td></tr>" for k, v in facts)
    notes_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    warning_html = (f"<p style='background:#fde8e8;padding:8px;border:1px solid #c33'><b>"
                    f"{escape(comparison.sentence('The best model'))}</b></p>"
                    if comparison is not None and comparison.warns else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>bnet study {escape(study_name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}}
figure{{display:inline-block;margin:8px;vertical-align:top}} img{{max-width:520px}}</style></head>
<body><h1>Study {escape(study_name)}</h1>{warning_html}<table>{facts_html}</table>
<h2>Best trials</h2><table><tr><th>trial</th>{''.join(f'<th>{escape(m)}</th>' for m in metric_names)}<th>run</th><th>parameters</th></tr>{rows}</table>
<h2>Figures</h2>{figures}{f'<h2>Notes</h2><ul>{notes_html}</ul>' if notes else ''}</body></html>
"""
