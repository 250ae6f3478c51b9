"""``softlabels report``: a self-contained HTML report (or Markdown tables) of stores and of the
students trained from them. Numbers in :mod:`.stats` and :mod:`.compare`, runs in :mod:`.runs`,
figures in :mod:`.figures`, layout in :mod:`.build` and :mod:`.html`."""

from softlabels.report.build import Report, build_report

__all__ = ["Report", "build_report"]
