from medrobust.reporting.robustness import (
    ROW_KEYS,
    format_eps,
    plot_curves,
    read_csv,
    summary_markdown,
    write_csv,
)

__all__ = ["ROW_KEYS", "format_eps", "plot_curves", "read_csv", "summary_markdown", "write_csv"]
