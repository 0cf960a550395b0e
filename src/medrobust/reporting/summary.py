"""``summary.md`` built from named sections, so no writer depends on who wrote before it.

Each writer (the robustness table, the universal perturbations, ...) keeps its section in
``run_dir/.summary/<order>_<name>.md``; every write rewrites ``summary.md`` as the concatenation of all sections
by ``order`` (then name). Whoever writes first or last, ``summary.md`` holds every section once, in the same
order; writing a section again replaces it.
"""

from __future__ import annotations

import re
from pathlib import Path

from medrobust.reporting.atomic import write_text_atomic

SECTIONS_DIR = ".summary"
# where the known sections go; a section not listed here goes after them unless its writer gives an order
SECTION_ORDER = {"robustness": 10, "universal_shift": 20}
DEFAULT_ORDER = 50
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_FILE = re.compile(r"(\d{3})_(.+)\.md")


def write_summary_section(run_dir: str | Path, name: str, markdown: str, order: int | None = None) -> Path:
    """Keep ``markdown`` as section ``name`` of ``run_dir/summary.md`` and rewrite that file; returns its path.

    ``order`` (0-999) places the section; ``None``: ``SECTION_ORDER[name]``, or ``DEFAULT_ORDER`` for a name
    not listed there."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"summary section name must be letters, digits, '_' or '-', got {name!r}")
    order = SECTION_ORDER.get(name, DEFAULT_ORDER) if order is None else order
    if not (isinstance(order, int) and 0 <= order <= 999):
        raise ValueError(f"summary section order must be an int in [0, 999], got {order!r} for section {name!r}")
    sections = Path(run_dir) / SECTIONS_DIR
    sections.mkdir(parents=True, exist_ok=True)
    new = write_text_atomic(sections / f"{order:03d}_{name}.md", markdown.rstrip() + "\n")
    for path, (_, old_name) in _sections(sections):
        if old_name == name and path != new:  # the same section written before at another order (after the new
            path.unlink()                     # one is whole: a kill in between never loses the section)
    text = "\n\n".join(path.read_text().rstrip() for path, _ in _sections(sections)) + "\n"
    return write_text_atomic(Path(run_dir) / "summary.md", text)


def _sections(folder: Path) -> list[tuple[Path, tuple[int, str]]]:
    """The section files with their ``(order, name)``, in summary order."""
    found = [(path, _FILE.fullmatch(path.name)) for path in folder.iterdir()]
    return sorted(((path, (int(m[1]), m[2])) for path, m in found if m), key=lambda item: item[1])
