from medrobust.reporting.robustness import (
    ROW_KEYS,
    format_eps,
    plot_curves,
    read_csv,
    summary_markdown,
    write_csv,
)
from medrobust.reporting.summary import SECTION_ORDER, write_summary_section

__all__ = ["ROW_KEYS", "SECTION_ORDER", "format_eps", "plot_curves", "read_csv", "summary_markdown", "write_csv",
           "write_summary_section"]
