"""results/*.json -> docs/RESULTS.md and plots."""
from flatquant.report.document import load_all, render_markdown, write_report

__all__ = ["load_all", "render_markdown", "write_report"]
