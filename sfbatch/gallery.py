"""``sfbatch gallery``: static HTML pages of an output directory's images.

Writes ``DIR/gallery/page-0001.html``, ``page-0002.html``, ... (``page_size`` cards each,
with first/prev/next/last links) and ``index.html``, a copy of page 1. Everything is
local and works from ``file://``: no server, no CDN; CSS and a little JS are inline.

One card per item (the latest record of each id, in input order)::

    <div class="card" data-status="ok" data-model="Kwai-Kolors/Kolors" id="c-000000042">

``ok`` cards show their images' thumbnails with prompt, seed, model, size and inference
time; ``failed`` and ``invalid`` cards show the error; ``generated`` and ``duplicate``
cards say what they are waiting for or duplicate. Status checkboxes and a model select
filter the cards of the page in the browser; ``<span id="shown-count">`` shows how many
are visible. The filter lives in the URL hash, so ``page-0001.html#status=failed,invalid``
or ``#model=Kwai-Kolors%2FKolors`` opens filtered, and the page links carry it along.

Thumbnails (JPEG, ``thumb_px`` on the long side) go to ``DIR/gallery/thumbs/``, mirroring
``images/``; one that exists and is newer than its image is reused, so a second call only
makes the new ones. They need Pillow (``pip install 'sfbatch[gallery]'``); without it, or
with ``thumbs=False`` (``--no-thumbs``), cards show the full images scaled down by the
browser. Writing the pages is separate from making thumbnails and takes seconds for
100,000 items; making 100,000 thumbnails is the slow part (decode every image).

Images in object storage (``s3://`` paths, a run with ``--images-to``) get no thumbnails
(a note says so): cards link the ``s3://`` URLs, or with ``presign=True`` (``--presign``)
show the images through presigned HTTPS URLs, valid for ``presign_expires_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import html
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import quote

from sfbatch.commands import Command, flag, given
from sfbatch.errors import ConfigError
from sfbatch.manifest import (
    STATUSES,
    ManifestRecord,
    latest_records,
    safe_relpath,
)
from sfbatch.reasons import Reason
from sfbatch.status import NoManifestError, required_manifests
from sfbatch.storage import ImageStore, StoreConfig, is_s3_url, open_store, parse_s3_url

__all__ = ["COMMANDS", "GalleryResult", "build_gallery"]

log = logging.getLogger("sfbatch")

EXIT_OK = 0
EXIT_USAGE = 2
DEFAULT_PAGE_SIZE = 200
DEFAULT_THUMB_PX = 256
_THUMB_QUALITY = 80
# Records the thumbnail size in use; a different size makes every thumbnail stale.
_THUMB_SIZE_FILE = "SIZE"
_PAGE_NAME = "page-{:04d}.html"
_PAGE_RE = re.compile(r"^page-(\d{4,})\.html$")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_PAGER_SPAN = 3
# Below this many thumbnails to make, starting worker processes costs more than it saves.
_POOL_MIN_JOBS = 32
_POOL_CHUNK = 16
# Thumbnail map value for an image file that is not on disk (real values start "thumbs/").
_MISSING = "missing"

ThumbProgress = Callable[[int, int], None]


@dataclass
class GalleryResult:
    """What :func:`build_gallery` wrote, and how long each phase took."""

    index: Path
    pages: int = 0
    cards: int = 0
    thumbs_enabled: bool = False
    thumbs_made: int = 0
    thumbs_reused: int = 0
    thumbs_failed: int = 0
    images_missing: int = 0
    notes: list[str] = field(default_factory=list)
    read_s: float = 0.0
    thumbs_s: float = 0.0
    html_s: float = 0.0


# -- thumbnails ----------------------------------------------------------------------


def _thumb_rel(image_rel: PurePosixPath) -> str:
    """``images/000/x.png`` → ``thumbs/000/x.jpg`` (relative to the gallery directory)."""
    parts = image_rel.parts[1:] if image_rel.parts[:1] == ("images",) else image_rel.parts
    return PurePosixPath("thumbs", *parts).with_suffix(".jpg").as_posix()


def _make_thumb(src: Path, dst: Path, px: int) -> None:
    from PIL import Image

    with Image.open(src) as opened:
        opened.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, much faster
        image = opened.convert("RGB") if opened.mode not in ("RGB", "L") else opened
        image.thumbnail((px, px))
        dst.parent.mkdir(parents=True, exist_ok=True)
        # Written aside then renamed: a half-written thumbnail would look fresh next time.
        tmp = dst.with_name(dst.name + ".tmp")
        image.save(tmp, "JPEG", quality=_THUMB_QUALITY)
    os.replace(tmp, dst)


def _freshness(src: Path, dst: Path, stale_all: bool) -> str:
    """``"missing"`` (no image), ``"reused"`` (thumbnail newer than image) or ``"make"``."""
    try:
        src_mtime = os.stat(src).st_mtime_ns
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "make"  # unreadable metadata: let the attempt to decode it decide
    if not stale_all:
        try:
            if os.stat(dst).st_mtime_ns >= src_mtime:
                return "reused"
        except OSError:
            pass
    return "make"


def _thumb_worker(job: tuple[str, str, int]) -> bool:
    """Make one thumbnail (runs in a worker process); False if the image cannot be read."""
    src, dst, px = job
    try:
        _make_thumb(Path(src), Path(dst), px)
    except Exception as exc:  # any undecodable image: the card falls back to the full one
        log.debug("thumbnail of %s failed: %s", src, exc)
        return False
    return True


def _pillow_available() -> bool:
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        return False
    return True


def _run_thumb_jobs(
    jobs: list[tuple[str, str, int]], workers: int | None, progress: ThumbProgress | None
) -> Iterator[bool]:
    """Results of :func:`_thumb_worker` for ``jobs``, in order.

    Pillow holds the GIL while it decodes a PNG, so threads do not help: a process pool
    does. Spawned, not forked, so that a host program's threads cannot deadlock a child.
    A handful of jobs run in-process, where starting the pool would cost more.
    """
    pool_size = workers or os.cpu_count() or 1
    if pool_size <= 1 or len(jobs) < _POOL_MIN_JOBS:
        results: Iterable[bool] = map(_thumb_worker, jobs)
        pool = None
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=pool_size, mp_context=multiprocessing.get_context("spawn")
        )
        results = pool.map(_thumb_worker, jobs, chunksize=_POOL_CHUNK)
    try:
        for done, ok in enumerate(results, start=1):
            if progress is not None and (done % _POOL_CHUNK == 0 or done == len(jobs)):
                progress(done, len(jobs))
            yield ok
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _make_thumbs(
    out_dir: Path,
    gallery_dir: Path,
    images: Iterable[PurePosixPath],
    px: int,
    result: GalleryResult,
    workers: int | None,
    progress: ThumbProgress | None,
) -> dict[PurePosixPath, str | None]:
    """Thumbnail path (relative to the gallery) per image.

    ``None`` when the image could not be thumbnailed (the card shows the full image),
    :data:`_MISSING` when the image file is not there.
    """
    thumbs_dir = gallery_dir / "thumbs"
    size_file = thumbs_dir / _THUMB_SIZE_FILE
    try:
        stale_all = size_file.read_text().strip() != str(px)
    except OSError:
        stale_all = thumbs_dir.exists()

    found: dict[PurePosixPath, str | None] = {}
    counts: Counter[str] = Counter()
    to_make: list[tuple[PurePosixPath, str]] = []
    for rel in images:
        thumb = _thumb_rel(rel)
        state = _freshness(out_dir / rel.as_posix(), gallery_dir / thumb, stale_all)
        if state == "make":
            to_make.append((rel, thumb))
            continue
        counts[state] += 1
        found[rel] = thumb if state == "reused" else _MISSING

    jobs = [(str(out_dir / rel.as_posix()), str(gallery_dir / thumb), px) for rel, thumb in to_make]
    outcomes = _run_thumb_jobs(jobs, workers, progress)
    for (rel, thumb), ok in zip(to_make, outcomes, strict=True):
        counts["made" if ok else "failed"] += 1
        found[rel] = thumb if ok else None
    # Recorded only once every thumbnail has the new size: an interrupted run that changed
    # the size leaves the old one here, and the next run remakes them all again.
    thumbs_dir.mkdir(parents=True, exist_ok=True)
    size_file.write_text(f"{px}\n")
    result.thumbs_made = counts["made"]
    result.thumbs_reused = counts["reused"]
    result.thumbs_failed = counts["failed"]
    result.images_missing = counts["missing"]
    return found


# -- HTML ----------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _url(rel: str) -> str:
    return _e(quote(rel, safe="/"))


def _model_of(record: ManifestRecord) -> str:
    model = record.get("model")
    return model if isinstance(model, str) and model else "(none)"


def _sort_key(record: ManifestRecord) -> tuple[str, int, int, str]:
    line = record.get("line")
    variation = record.get("variation")
    return (
        str(record.get("file") or ""),
        line if isinstance(line, int) else 0,
        variation if isinstance(variation, int) else 0,
        str(record["id"]),
    )


def _error_text(record: ManifestRecord) -> str:
    error = record.get("error")
    message = str(error.get("message") or "") if isinstance(error, dict) else ""
    return Reason.of(str(record.get("status")), error).describe(message)


def _dims(record: ManifestRecord, px: int) -> str:
    """``width``/``height`` attributes scaled to ``px``, so lazy images keep their place."""
    size = record.get("image_size")
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if not match:
        return f' width="{px}"'
    w, h = int(match.group(1)), int(match.group(2))
    if w <= 0 or h <= 0:
        return f' width="{px}"'
    scale = px / max(w, h)
    return f' width="{max(1, round(w * scale))}" height="{max(1, round(h * scale))}"'


class _Renderer:
    def __init__(
        self,
        latest: dict[str, ManifestRecord],
        page_of: dict[str, int],
        thumbs: dict[PurePosixPath, str | None] | None,
        px: int,
        presigned: dict[str, str] | None = None,
    ) -> None:
        self.latest = latest
        self.page_of = page_of
        self.thumbs = thumbs
        self.px = px
        self.presigned = presigned

    def _object(self, url: str, dims: str) -> str:
        """An image in object storage: its presigned URL shown, else its s3:// URL linked."""
        if self.presigned is not None and url in self.presigned:
            shown = _e(self.presigned[url])
            return (
                f'<a href="{shown}"><img loading="lazy" decoding="async" '
                f'src="{shown}"{dims} alt=""></a>'
            )
        return f'<a class="object" href="{_e(url)}">{_e(url)}</a>'

    def images(self, record: ManifestRecord) -> str:
        parts = []
        dims = _dims(record, self.px)
        images = record.get("images")
        for image in images if isinstance(images, list) else ():
            path = image.get("path") if isinstance(image, dict) else None
            if is_s3_url(path or ""):
                parts.append(self._object(str(path), dims))
                continue
            rel = safe_relpath(path)
            if rel is None:
                continue
            full = _url("../" + rel.as_posix())
            thumb = self.thumbs.get(rel) if self.thumbs is not None else None
            if thumb == _MISSING:
                parts.append(f'<a class="missing" href="{full}">image file missing</a>')
                continue
            src = _url(thumb) if thumb else full
            parts.append(
                f'<a href="{full}"><img loading="lazy" decoding="async" '
                f'src="{src}"{dims} alt=""></a>'
            )
        if not parts:
            return ""
        many = " many" if len(parts) > 1 else ""
        return f'<div class="imgs{many}">{"".join(parts)}</div>'

    def card(self, record: ManifestRecord) -> str:
        row_id = str(record["id"])
        status = str(record.get("status"))
        model = _model_of(record)
        body: list[str] = []
        if status == "ok":
            body.append(self.images(record))
        elif status in ("failed", "invalid"):
            body.append(f'<p class="reason">{_e(_error_text(record))}</p>')
        elif status == "generated":
            body.append('<p class="note">paid for, not downloaded yet: resume the run</p>')
        elif status == "duplicate":
            original = str(record.get("duplicate_of") or "")
            page = self.page_of.get(original)
            if page:
                href = _e(f"{_PAGE_NAME.format(page)}#c-{quote(original, safe='')}")
                link = f'<a href="{href}">{_e(original)}</a>'
            else:
                link = _e(original)
            body.append(f'<p class="note">duplicate of {link}</p>')
            source = self.latest.get(original)
            if source is not None and source.get("status") == "ok":
                body.append(self.images(source))
        prompt = record.get("prompt")
        if isinstance(prompt, str) and prompt:
            body.append(f'<p class="prompt" title="{_e(prompt)}">{_e(prompt)}</p>')
        facts = [f'<span class="badge">{_e(status)}</span>', f"<span>{_e(row_id)}</span>"]
        if record.get("seed") is not None:
            facts.append(f"<span>seed {_e(record['seed'])}</span>")
        if model != "(none)":
            facts.append(f'<span class="model">{_e(model)}</span>')
        if record.get("image_size"):
            facts.append(f"<span>{_e(record['image_size'])}</span>")
        timings = record.get("timings")
        inference = timings.get("inference") if isinstance(timings, dict) else None
        if isinstance(inference, int | float) and not isinstance(inference, bool):
            facts.append(f"<span>{inference:.2f} s</span>")
        body.append(f'<p class="facts">{" · ".join(facts)}</p>')
        return (
            f'<div class="card" data-status="{_e(status)}" data-model="{_e(model)}" '
            f'id="c-{_e(row_id)}">{"".join(body)}</div>'
        )


def _pager(page: int, pages: int) -> str:
    def link(target: int, text: str, cls: str = "") -> str:
        href = _PAGE_NAME.format(target)
        klass = f"pg {cls}".strip()
        return f'<a class="{klass}" href="{href}" data-href="{href}">{text}</a>'

    items: list[str] = []
    items.append(link(1, "« first") if page > 1 else '<span class="off">« first</span>')
    items.append(
        link(page - 1, "‹ prev", "prev") if page > 1 else '<span class="off">‹ prev</span>'
    )
    for n in range(max(1, page - _PAGER_SPAN), min(pages, page + _PAGER_SPAN) + 1):
        items.append(f'<span class="cur">{n}</span>' if n == page else link(n, str(n)))
    items.append(
        link(page + 1, "next ›", "next") if page < pages else '<span class="off">next ›</span>'
    )
    items.append(link(pages, "last »") if page < pages else '<span class="off">last »</span>')
    return f'<nav class="pager">{" ".join(items)} <span>page {page} of {pages}</span></nav>'


_CSS = """
:root{--px:%(px)dpx;font-family:system-ui,sans-serif;font-size:14px;color:#222;background:#f4f4f4}
body{margin:0 16px 24px}
header{position:sticky;top:0;background:#f4f4f4ee;padding:8px 0;border-bottom:1px solid #ddd;
z-index:1}
h1{font-size:18px;margin:4px 0}
.filters{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:6px 0}
.filters label{white-space:nowrap}
.pager{margin:8px 0}.pager a,.pager span{margin-right:6px}.pager .off{color:#aaa}
.pager .cur{font-weight:bold}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--px),1fr));gap:12px;
margin-top:12px;align-items:start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;overflow:hidden}
.card[hidden]{display:none}
.card[data-status=failed],.card[data-status=invalid]{border-color:#d66;background:#fff6f6}
.card[data-status=generated]{border-color:#d9b44a}
.imgs{display:grid;gap:4px}.imgs.many{grid-template-columns:1fr 1fr}
.imgs img{display:block;width:100%%;height:auto;max-width:var(--px);background:#eee}
.prompt{margin:6px 0 2px;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical;
overflow:hidden}
.facts{margin:2px 0;color:#666;font-size:12px;overflow-wrap:anywhere}
.badge{font-weight:bold;color:#333}
.reason{color:#a11;overflow-wrap:anywhere;margin:4px 0}.note{color:#865;margin:4px 0}
.missing{color:#a11}
"""

_JS = """
(function(){
var cards=Array.prototype.slice.call(document.querySelectorAll('.card'));
var boxes=Array.prototype.slice.call(document.querySelectorAll('input[name=status]'));
var sel=document.getElementById('model');
var out=document.getElementById('shown-count');
function hash(){
  var parts=[],on=[],all=true;
  boxes.forEach(function(b){if(b.checked){on.push(b.value)}else{all=false}});
  if(!all)parts.push('status='+on.join(','));
  if(sel.value)parts.push('model='+encodeURIComponent(sel.value));
  return parts.join('&');
}
function apply(remember){
  var on={},m=sel.value,n=0;
  boxes.forEach(function(b){if(b.checked)on[b.value]=1});
  cards.forEach(function(c){
    var show=!!on[c.getAttribute('data-status')]&&(!m||c.getAttribute('data-model')===m);
    c.hidden=!show;if(show)n++;
  });
  out.textContent=String(n);
  var h=hash();
  document.querySelectorAll('a.pg').forEach(function(a){
    a.href=a.getAttribute('data-href')+(h?'#'+h:'');
  });
  if(remember){try{history.replaceState(null,'',h?'#'+h:location.pathname)}catch(e){}}
}
function load(){
  var p=new URLSearchParams(location.hash.slice(1)),s=p.get('status'),m=p.get('model');
  if(s!==null){var want=s.split(',');boxes.forEach(function(b){b.checked=want.indexOf(b.value)>=0})}
  else{boxes.forEach(function(b){b.checked=true})}
  sel.value=m||'';if(sel.value!==(m||''))sel.value='';
  apply(false);
}
boxes.forEach(function(b){b.addEventListener('change',function(){apply(true)})});
sel.addEventListener('change',function(){apply(true)});
window.addEventListener('hashchange',load);
load();
})();
"""


def _page_html(
    *,
    title: str,
    cards: list[str],
    page: int,
    pages: int,
    statuses: list[str],
    status_counts: Counter[str],
    models: list[str],
    css: str,
    note: str,
) -> str:
    boxes = " ".join(
        f'<label><input type="checkbox" name="status" value="{_e(s)}" checked> '
        f"{_e(s)} <small>({status_counts.get(s, 0):,})</small></label>"
        for s in statuses
    )
    options = "".join(f'<option value="{_e(m)}">{_e(m)}</option>' for m in models)
    pager = _pager(page, pages)
    note_html = f'<p class="note">{_e(note)}</p>' if note else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)} — page {page}</title><style>{css}</style></head><body>"
        f"<header><h1>{_e(title)}</h1>"
        f'<div class="filters">{boxes}'
        f'<label>model <select id="model"><option value="">all models</option>{options}'
        "</select></label>"
        f'<span>showing <span id="shown-count">{len(cards)}</span> of {len(cards)} '
        "on this page</span></div>"
        f"{note_html}{pager}</header>"
        f'<main class="grid">{"".join(cards)}</main>'
        f"{pager}<script>{_JS}</script></body></html>\n"
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_gallery(
    out_dir: Path,
    *,
    page_size: int = DEFAULT_PAGE_SIZE,
    thumb_px: int = DEFAULT_THUMB_PX,
    thumbs: bool = True,
    workers: int | None = None,
    progress: ThumbProgress | None = None,
    presign: bool = False,
    presign_expires_s: int = 7 * 24 * 3600,
) -> GalleryResult:
    """Write ``out_dir/gallery/`` from the manifests; see the module docstring.

    ``thumbs=False`` skips thumbnails (cards use the full images). ``progress(done,
    total)`` is called as thumbnails are made. ``presign``: ``s3://`` images are shown
    through presigned URLs (valid ``presign_expires_s``) instead of linked. Raises
    :class:`NoManifestError` when ``out_dir`` has no manifest and ``ValueError`` for a
    page size or thumb size below 1.
    """
    if page_size < 1 or thumb_px < 1:
        raise ValueError("page_size and thumb_px must be 1 or more")
    started = time.monotonic()
    paths = required_manifests(out_dir)
    latest = latest_records(paths)
    records = sorted(latest.values(), key=_sort_key)
    gallery_dir = out_dir / "gallery"
    gallery_dir.mkdir(parents=True, exist_ok=True)
    result = GalleryResult(index=gallery_dir / "index.html", cards=len(records))
    result.read_s = time.monotonic() - started

    started = time.monotonic()
    thumb_map: dict[PurePosixPath, str | None] | None = None
    if thumbs and not _pillow_available():
        result.notes.append(
            f"Pillow is not installed ({PILLOW_HINT}): "
            "the pages show the full images, scaled down by the browser"
        )
    elif thumbs:
        result.thumbs_enabled = True
        wanted: dict[PurePosixPath, None] = {}
        for record in records:
            if record.get("status") != "ok" or not isinstance(record.get("images"), list):
                continue
            for image in record["images"]:
                path = image.get("path") if isinstance(image, dict) else None
                rel = None if is_s3_url(path or "") else safe_relpath(path)
                if rel is not None:
                    wanted[rel] = None
        thumb_map = _make_thumbs(out_dir, gallery_dir, wanted, thumb_px, result, workers, progress)
    result.thumbs_s = time.monotonic() - started
    objects = sorted(
        {
            str(image["path"])
            for record in records
            if record.get("status") == "ok" and isinstance(record.get("images"), list)
            for image in record["images"]
            if isinstance(image, dict) and is_s3_url(image.get("path") or "")
        }
    )
    presigned: dict[str, str] | None = None
    if objects:
        how = "shown through presigned URLs" if presign else "linked (--presign shows them)"
        result.notes.append(
            f"{len(objects):,} images are in object storage: no thumbnails for them, {how}"
        )
        if presign:
            presigned = asyncio.run(_presign_all(objects, presign_expires_s))

    started = time.monotonic()
    pages = max(1, math.ceil(len(records) / page_size))
    page_of = {str(r["id"]): i // page_size + 1 for i, r in enumerate(records)}
    renderer = _Renderer(latest, page_of, thumb_map, thumb_px, presigned)
    status_counts = Counter(str(r.get("status")) for r in records)
    statuses = [*STATUSES, *sorted(s for s in status_counts if s not in STATUSES)]
    models = sorted({_model_of(r) for r in records})
    css = _CSS % {"px": thumb_px}
    title = f"sfbatch gallery: {out_dir.resolve().name} ({len(records):,} items)"
    note = result.notes[0] if result.notes else ""
    for page in range(1, pages + 1):
        chunk = records[(page - 1) * page_size : page * page_size]
        text = _page_html(
            title=title,
            cards=[renderer.card(r) for r in chunk],
            page=page,
            pages=pages,
            statuses=statuses,
            status_counts=status_counts,
            models=models,
            css=css,
            note=note,
        )
        _write(gallery_dir / _PAGE_NAME.format(page), text)
        if page == 1:
            _write(result.index, text)
    for stale in gallery_dir.iterdir():
        match = _PAGE_RE.match(stale.name)
        if match and int(match.group(1)) > pages:
            stale.unlink()
    result.pages = pages
    result.html_s = time.monotonic() - started
    return result


async def _presign_all(urls: list[str], expires_s: int) -> dict[str, str]:
    """A presigned GET URL per ``s3://`` URL (signed locally: no request per image)."""
    stores: dict[str, ImageStore] = {}
    signed: dict[str, str] = {}
    config = StoreConfig(presign_expires_s=expires_s)
    try:
        for url in urls:
            bucket, key = parse_s3_url(url)
            if bucket not in stores:
                stores[bucket] = await open_store(f"s3://{bucket}", config).__aenter__()
            signed[url] = await stores[bucket].presign(key)
    finally:
        for store in stores.values():
            await store.aclose()
    return signed


# -- CLI -----------------------------------------------------------------------------


# ``sfbatch[gallery]`` resolves only on a package index; a checkout installs its own extra.
PILLOW_HINT = "pip install 'sfbatch[gallery]', or from a checkout: pip install '.[gallery]'"


def gallery_command(args: argparse.Namespace) -> int:
    """write static HTML pages of thumbnails to DIR/gallery/

    Write DIR/gallery/index.html and page-NNNN.html: thumbnails with prompt, seed, model,
    size and inference time; failed and invalid items with their reason; filters by status
    and model. Works from file://. Thumbnails need Pillow ({pillow_hint}) and are reused
    when newer than their image.
    """
    if args.page_size < 1 or args.thumb_px < 1:
        print("sfbatch gallery: --page-size and --thumb-px must be 1 or more", file=sys.stderr)
        return EXIT_USAGE
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 or done == total:
            last[0] = now
            print(f"thumbnails: {done:,}/{total:,}", file=sys.stderr)

    try:
        result = build_gallery(args.dir, progress=progress, **given(args, _FLAGS))
    except (NoManifestError, ConfigError) as exc:  # ConfigError: the s3 extra is missing
        print(f"sfbatch gallery: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in result.notes:
        print(f"sfbatch gallery: {note}", file=sys.stderr)
    thumbs = "thumbnails off"
    if result.thumbs_enabled:
        thumbs = (
            f"thumbnails {result.thumbs_s:.1f} s: {result.thumbs_made:,} made, "
            f"{result.thumbs_reused:,} reused, {result.thumbs_failed:,} failed, "
            f"{result.images_missing:,} images missing"
        )
    print(
        f"wrote {result.pages:,} page{'s' if result.pages != 1 else ''} "
        f"({result.cards:,} cards) to {result.index} "
        f"(read {result.read_s:.1f} s; {thumbs}; html {result.html_s:.1f} s)"
    )
    return EXIT_OK


#: The flags of ``sfbatch gallery``: DIR, then each a :func:`build_gallery` argument.
_FLAGS: Final = (
    flag("dir", type=Path, metavar="DIR"),
    flag(
        "--page-size",
        f"cards per page (default {DEFAULT_PAGE_SIZE})",
        field="page_size",
        type=int,
        default=DEFAULT_PAGE_SIZE,
    ),
    flag(
        "--thumb-px",
        f"thumbnail size in pixels, long side (default {DEFAULT_THUMB_PX})",
        field="thumb_px",
        type=int,
        default=DEFAULT_THUMB_PX,
    ),
    flag(
        "--no-thumbs",
        "make no thumbnails: the pages show the full images, scaled down",
        field="thumbs",
        action="store_false",
    ),
    flag(
        "--presign",
        "show s3:// images through presigned URLs (valid 7 days) instead of linking them",
        field="presign",
        action="store_true",
    ),
)

COMMANDS: Final = (Command("gallery", gallery_command, _FLAGS, {"pillow_hint": PILLOW_HINT}),)
