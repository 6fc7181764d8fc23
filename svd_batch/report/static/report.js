const M = JSON.parse(document.getElementById('meta').textContent);
const D = new Array(M.chunks); let loaded = 0, view = null;
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function val(col, i) { const k = Math.floor(i / M.chunkRows), c = D[k][col]; return Array.isArray(c) ? c[i - k * M.chunkRows] : c; }
const S = {sort: 'row', order: 'asc', failed: false, below: '', page: 0};
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  S.sort = h.get('sort') || 'row'; S.order = h.get('order') || 'asc'; S.failed = h.get('failed') === '1';
  S.below = h.get('below') || ''; S.page = Math.max(0, (parseInt(h.get('page') || '1') || 1) - 1);
  $('sort').value = S.sort; $('order').value = S.order; $('failed').checked = S.failed;
  const [bc, bt] = S.below.split(':'); $('belowcol').value = bc || M.scores[0] || ''; $('belowval').value = bt || '';
}
function writeHash() {
  const h = new URLSearchParams();
  if (S.sort !== 'row') h.set('sort', S.sort); if (S.order !== 'asc') h.set('order', S.order);
  if (S.failed) h.set('failed', '1'); if (S.below) h.set('below', S.below); if (S.page) h.set('page', S.page + 1);
  history.replaceState(null, '', '#' + h.toString());
}
function key(col, i) {
  if (col === 'row') return i;
  const v = val(col, i);
  return v === null || v === undefined || (typeof v === 'number' && isNaN(v)) ? null : v;
}
function compute() {
  // Manifest order with no filter needs no rows at all: a page shows once its chunk is in.
  if (S.sort === 'row' && S.order === 'asc' && !S.failed && !S.below) return null;
  if (loaded < M.chunks) return undefined;
  let idx = [];
  const [bc, bt] = S.below.split(':'); const thr = parseFloat(bt);
  for (let i = 0; i < M.n; i++) {
    if (S.failed && val('st', i) !== 1) continue;
    if (S.below && !isNaN(thr)) { const v = key(bc, i); if (v === null || !(v < thr)) continue; }
    idx.push(i);
  }
  if (S.sort !== 'row' || S.order !== 'asc') {
    const col = S.sort === 'status' ? 'st' : S.sort === 'seconds' ? 'total_seconds' : S.sort;
    const keys = idx.map(i => key(col, i)), pos = idx.map((_, j) => j), dir = S.order === 'desc' ? -1 : 1;
    pos.sort((a, b) => { const x = keys[a], y = keys[b];
      if (x === null) return y === null ? idx[a] - idx[b] : 1; if (y === null) return -1;
      return x < y ? -dir : x > y ? dir : idx[a] - idx[b]; });
    idx = pos.map(j => idx[j]);
  }
  return idx;
}
function label(i) {
  const g = c => val(c, i);
  return `seed ${g('seed')} · ${g('num_frames')} frames @ ${g('fps')} fps · motion ${g('motion_bucket_id')} · ` +
    `noise ${g('noise_aug_strength')} · ${g('width')}x${g('height')} · ${g('num_inference_steps')} steps · ` +
    `guidance ${g('min_guidance_scale')}-${g('max_guidance_scale')} · rank ${g('rank')} on ${M.hosts[g('host')]}`;
}
// Only files svd-batch wrote in the run folder are ever loaded: <dir>/<id>.<ext> when the data says the file is
// there (1), <dir>/<sub>/<id>.<ext> in a spread folder (the two-hex-digit subfolder); a row's own image reference
// (a URL, a device, any path) is shown as text, never fetched.
const fileName = s => String(s).replace(/[^A-Za-z0-9._=+,@-]/g, encodeURIComponent);
function path(col, dir, ext, i) {
  const v = val(col, i), name = `${fileName(val('id', i))}.${ext}`;
  return v === 1 ? `${dir}/${name}` : (typeof v === 'string' && /^[0-9a-f]{2}$/.test(v) ? `${dir}/${v}/${name}` : '');
}
function card(i) {
  const id = esc(val('id', i)), ok = val('st', i) === 0, img = path('img', M.inputs, 'jpg', i), vid = path('vid', 'videos', 'mp4', i);
  const ar = `--ar:${val('width', i)}/${val('height', i)}`;
  const scores = M.scores.map(c => { const v = val(c, i); return `${c} ${v === null || isNaN(v) ? 'n/a' : v}`; }).join(' · ');
  const k = Math.floor(i / M.chunkRows), src = (D[k].src || {})[i - k * M.chunkRows];
  // The video gets its file only while on screen (see io), and shows its input image until it plays.
  const media = (img ? `<img class="in" src="${esc(img)}" alt="input of ${id}" data-id="${id}" loading="eager">`
                     : `<div class="ref">${src ? 'image: ' + esc(src) : ''}</div>`) +
    (vid ? `<video data-src="${esc(vid)}"${img ? ` poster="${esc(img)}"` : ''} muted loop playsinline preload="none" data-id="${id}"></video>`
         : `<div class="ref">${ok ? 'video file missing' : ''}</div>`);
  return `<div class="card${ok ? '' : ' failed'}" data-id="${id}" data-row="${i}" style="${ar}"><div class="pair">${media}</div>` +
    `<div class="id">${id}</div><div class="meta">${esc(label(i))}</div>` +
    (ok ? `<div class="sc">${esc(scores)} · made in ${val('total_seconds', i)} s</div>` : `<div class="err">${esc(val('err', i) || 'failed')}</div>`) + '</div>';
}
// Chromium keeps only a few dozen media players per page: a video holds one only while it is on screen (or
// near it); one that leaves, or whose page is turned, gives its player back (no src, then load()).
function attach(el) { if (!el.getAttribute('src')) el.src = el.dataset.src; el.play().catch(() => {}); }
function release(el) { el.pause(); el.removeAttribute('src'); el.load(); delete el.dataset.playing; }
const io = new IntersectionObserver(es => es.forEach(e => e.isIntersecting ? attach(e.target) : release(e.target)),
                                    {rootMargin: '50% 0px'});
function render() {
  const v = compute();
  if (v === undefined) { $('status').textContent = `loading rows: ${loaded} of ${M.chunks} parts`; return; }
  const total = v === null ? M.n : v.length, pages = Math.max(1, Math.ceil(total / M.pageSize));
  S.page = Math.min(S.page, pages - 1);
  const lo = S.page * M.pageSize, hi = Math.min(total, lo + M.pageSize), rows = [];
  for (let j = lo; j < hi; j++) rows.push(v === null ? j : v[j]);
  if (v === null && rows.length && !D[Math.floor(rows[rows.length - 1] / M.chunkRows)]) { $('status').textContent = 'loading rows...'; return; }
  $('status').textContent = `${total} rows match · page ${S.page + 1} of ${pages}`;
  $('pageno').value = S.page + 1; $('pageno').max = pages; $('pageof').textContent = `page ${S.page + 1} of ${pages}`;
  io.disconnect();
  $('grid').querySelectorAll('video').forEach(release);
  $('grid').innerHTML = rows.map(card).join('');
  $('grid').querySelectorAll('video').forEach(el => {
    el.addEventListener('loadedmetadata', () => { el.dataset.duration = el.duration; });
    el.addEventListener('playing', () => { el.dataset.playing = '1'; });
    el.addEventListener('error', () => { el.dataset.error = el.error ? el.error.code : '?'; });
    io.observe(el);
  });
  $('grid').querySelectorAll('img.in').forEach(el => {
    const mark = () => { el.dataset.loaded = el.naturalWidth > 0 ? '1' : '0'; };
    el.complete ? mark() : (el.addEventListener('load', mark), el.addEventListener('error', mark));
  });
  writeHash();
}
function update() {
  S.sort = $('sort').value; S.order = $('order').value; S.failed = $('failed').checked;
  const t = $('belowval').value.trim(); S.below = t === '' ? '' : `${$('belowcol').value}:${t}`;
  S.page = 0; render();
}
window.SVD = {chunk(k, cols) { D[k] = cols; loaded++; if (loaded === M.chunks) document.body.dataset.loaded = '1'; render(); }};
['sort', 'order', 'failed', 'belowcol', 'belowval'].forEach(id => $(id).addEventListener('change', update));
const turn = (by, scroll) => { S.page = Math.max(0, S.page + by); render(); if (scroll) $('videos').scrollIntoView(); };
$('prev').onclick = () => turn(-1); $('next').onclick = () => turn(1);
$('prev2').onclick = () => turn(-1, true); $('next2').onclick = () => turn(1, true);
$('tovideos').onclick = () => $('videos').scrollIntoView();
if ($('tofailed')) $('tofailed').onclick = () => $('failedrows').scrollIntoView();
$('pageno').onchange = () => { S.page = Math.max(0, (parseInt($('pageno').value) || 1) - 1); render(); };
window.addEventListener('hashchange', () => { readHash(); render(); });
readHash();
if (!M.chunks) { document.body.dataset.loaded = '1'; render(); }
for (let k = 0; k < M.chunks; k++) { const s = document.createElement('script'); s.src = `${M.dir}/data-${String(k).padStart(5, '0')}.js`; document.body.appendChild(s); }
