"""Statistics and plots over the zoo: SQL aggregates, matplotlib figures, csv/parquet/xlsx exports.

Public API:
- `stats.plots.render(kind, zoo, filters, width=, height=, models=) -> PlotResult` and `PLOT_KINDS`;
- `stats.aggregates`: `epoch_summary`, `model_epoch_stats`, `leaderboard`, `model_best`, `pareto_mask`,
  `accuracy_vs_time`, `value_stats`, `accuracy_histogram`, `timeline`, `failures`, `correlation`, `catalog`;
- `stats.export.export(zoo, out, fmt, filters, table=)` (csv/parquet tables, or the xlsx report of
  `stats.report`);
- `stats.cli.add_stats_subparsers(subparsers)` for `lemur-agent-server stats export|plot`.
Which rows each statistic reads (points, runs' last points, best run per model) is in `stats.scope`.
"""
