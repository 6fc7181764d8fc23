"""See the results: a static HTML report (``index.html``) and a contact sheet (``contact_sheet.png``).

Written at the end of every run, and by ``svd-batch-report <output.dir>`` for any finished or interrupted
run. The size of what is written grows linearly with the rows (about 100 bytes a row at most): one page
with the summary and charts as HTML, and the rows as compact column arrays in ``report/data-NNNNN.js``
chunks that the page loads with ``<script src>`` (``fetch()`` of ``file://`` is blocked in Chromium, a
script tag is not), so the page opens from disk with no server. The page builds markup only for the rows
on screen; paging, sorting and filtering run over the arrays. The view is kept in the URL fragment
(``#sort=motion_score&order=asc&failed=1&below=image_similarity:0.8&page=3``), so it can be shared.
"""

from __future__ import annotations

from .page import write_gallery
from .sheet import save_thumbnails, write_contact_sheet

__all__ = ["write_report", "write_gallery", "write_contact_sheet", "save_thumbnails"]


def write_report(root: str, page_size: int = 48, contact_rows: int = 16) -> list[str]:
    """The contact sheet and index.html (with its row data) of the run folder ``root``; the paths written."""
    sheet = write_contact_sheet(root, contact_rows)
    pages = write_gallery(root, page_size)
    return ([sheet] if sheet else []) + pages
