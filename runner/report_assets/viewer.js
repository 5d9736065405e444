// The sweep viewer: plain JavaScript, no build step, no network. It draws everything from the JSON document in
// #viewer-data (written by runner/viewer.py): the grid of images with any swept key across, down or per page and
// the others as filters, a cell's detail, the A/B compare, the charts (Plotly, inlined as text and run when first needed) and the
// results table. Timings of each grid drawing are kept in window.viewerTimings (the tests print them).
(function () {
  'use strict';
  const scriptStart = performance.now();
  const D = JSON.parse(document.getElementById('viewer-data').textContent);
  const columns = D.rows.columns;
  const rows = D.rows.data.map(values => {
    const row = {};
    columns.forEach((c, i) => { row[c] = values[i]; });
    return row;
  });
  const axes = D.axes;  // [{key, values}] in the order typed
  const axisKeys = axes.map(a => a.key);
  const lower = new Set(D.lower_is_better);
  const $ = id => document.getElementById(id);
  window.viewerTimings = { renders: [], scriptStart, parsed: performance.now() };

  // plotly.js rides in the page as text (#plotly-source) and runs the first time a chart is needed.
  function withPlotly(draw) {
    if (!window.Plotly) {
      const source = document.getElementById('plotly-source');
      if (!source) return;
      const start = performance.now();
      const script = document.createElement('script');
      script.textContent = source.textContent;
      document.head.append(script);  // an inline script runs as it is inserted
      window.viewerTimings.plotly = performance.now() - start;
    }
    if (window.Plotly) draw(window.Plotly);
  }

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v; else if (k === 'text') node.textContent = v;
      else if (k in node && typeof v !== 'string') node[k] = v; else node.setAttribute(k, v);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  const valueKey = v => JSON.stringify(v === undefined ? null : v);
  function fmt(v) {
    if (v === null || v === undefined || v === '') return '—';
    if (typeof v === 'number') return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(4)));
    return String(v);
  }
  // under a cell: a fixed number of decimals reads better across a row than significant digits (1.5e-11)
  const fmtCaption = v => (typeof v === 'number' ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3)) : fmt(v));
  const numeric = v => (typeof v === 'number' ? v : v === 'inf' ? Infinity : v === '-inf' ? -Infinity : null);
  const esc = s => String(s).replace(/[&<>"']/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));

  // Rows by their values on every axis: a grid cell is one lookup.
  const byAxes = new Map();
  const comboKey = values => values.map(valueKey).join('\u0001');
  rows.forEach((row, i) => {
    const key = comboKey(axisKeys.map(a => row[a]));
    if (!byAxes.has(key)) byAxes.set(key, []);
    byAxes.get(key).push(i);
  });
  function rowsAt(spec) { return byAxes.get(comboKey(axisKeys.map(a => spec[a]))) || []; }
  const describe = (i, keys) => (keys || axisKeys).map(a => `${a}=${fmt(rows[i][a])}`).join(' · ');

  // ---------------------------------------------------------------- state
  const state = {
    x: D.default_axes.x, y: D.default_axes.y, page: D.default_axes.page,
    filters: Object.fromEntries(axes.map(a => [a.key, a.values[0]])),
    caption: D.captions[0] || '', best: D.captions.length > 0, cell: 128, A: null, B: null,
  };
  const roles = ['x', 'y', 'page'];

  // ---------------------------------------------------------------- controls
  function fillAxisSelect(select, role) {
    select.textContent = '';
    select.append(el('option', { value: '', text: '—' }));
    for (const key of axisKeys) select.append(el('option', { value: key, text: key }));
    select.value = state[role] || '';
    select.onchange = () => setRole(role, select.value || null);
  }
  function setRole(role, key) {
    const previous = state[role];
    for (const other of roles) if (other !== role && key && state[other] === key) state[other] = previous;
    state[role] = key;
    refresh();
  }
  function renderControls() {
    fillAxisSelect($('axis-x'), 'x'); fillAxisSelect($('axis-y'), 'y'); fillAxisSelect($('axis-page'), 'page');
    const filters = $('filters');
    filters.textContent = '';
    for (const axis of axes) {
      if (roles.some(r => state[r] === axis.key)) continue;
      const group = el('span', { class: 'filter', 'data-axis': axis.key }, el('b', { text: axis.key }));
      for (const value of axis.values) {
        const button = el('button', { text: fmt(value), 'data-value': valueKey(value),
          class: valueKey(value) === valueKey(state.filters[axis.key]) ? 'active' : '' });
        button.onclick = () => { state.filters[axis.key] = value; refresh(); };
        group.append(button);
      }
      filters.append(group);
    }
  }
  function setupStaticControls() {
    const caption = $('caption');
    caption.append(el('option', { value: '', text: 'nothing' }));
    for (const c of D.captions) caption.append(el('option', { value: c, text: c }));
    caption.value = state.caption;
    caption.onchange = () => { state.caption = caption.value; renderGrid(); };
    $('best').checked = state.best;
    $('best').onchange = () => { state.best = $('best').checked; renderGrid(); };
    $('cell-size').value = state.cell;
    $('cell-size').oninput = () => {
      state.cell = Number($('cell-size').value);
      document.documentElement.style.setProperty('--cell', state.cell + 'px');
      renderGrid();  // large cells switch from thumbnails to the full images
    };
    $('swap').onclick = () => { [state.x, state.y] = [state.y, state.x]; refresh(); };
  }

  // ---------------------------------------------------------------- the grid
  function imageSource(i, size) {
    const image = D.images[i];
    if (!image) return null;
    return !image.exact && size > image.tw ? image.full : image.thumb;
  }
  function better(a, b) { return lower.has(state.caption) ? a < b : a > b; }

  function renderGrid() {
    const start = performance.now();
    const xs = state.x ? axes.find(a => a.key === state.x).values : [null];
    const ys = state.y ? axes.find(a => a.key === state.y).values : [null];
    const pages = state.page ? axes.find(a => a.key === state.page).values : [null];
    const fragment = document.createDocumentFragment();
    const pending = [];
    for (const pageValue of pages) {
      const section = el('section', { class: 'page' });
      if (state.page) section.append(el('h3', { text: `${state.page} = ${fmt(pageValue)}` }));
      const table = el('table', { class: 'grid' });
      const head = el('tr', {}, el('th', { class: 'corner', text: state.y ? `${state.y} ↓` : '' }));
      if (state.x) {
        table.append(el('tr', {}, el('th'), el('th', { class: 'axis', colSpan: xs.length, text: `${state.x} →` })));
        for (const xv of xs) head.append(el('th', { class: 'xlabel', text: fmt(xv) }));
      }
      table.append(head);
      for (const yv of ys) {
        const tr = el('tr', {}, el('th', { class: 'ylabel', text: state.y ? fmt(yv) : '' }));
        const cells = [];
        for (const xv of xs) {
          const spec = Object.assign({}, state.filters);
          if (state.x) spec[state.x] = xv;
          if (state.y) spec[state.y] = yv;
          if (state.page) spec[state.page] = pageValue;
          const found = rowsAt(spec);
          const td = el('td', { class: 'cell' });
          const i = found.length ? found[0] : null;
          if (i !== null && D.images[i]) {
            td.dataset.row = i;
            const img = el('img', { decoding: 'async', class: D.images[i].exact ? 'exact' : '', alt: describe(i), elementtiming: 'cell',
              width: D.images[i].tw, height: D.images[i].th });
            img.dataset.src = imageSource(i, state.cell);
            td.append(img);
            pending.push(img);
            if (i === state.A) td.classList.add('pick-a');
            if (i === state.B) td.classList.add('pick-b');
            if (i === state.A || i === state.B) td.append(el('span', { class: 'badge', text: i === state.A ? 'A' : 'B' }));
            if (found.length > 1) td.append(el('span', { class: 'more', text: `+${found.length - 1}` }));
            if (state.caption) {
              const value = rows[i][state.caption];
              td.append(el('div', { class: 'cap', text: fmtCaption(value) }));
              // ranked by the value as shown: cells that read the same are equally best
              if (typeof value === 'number') cells.push([Number(fmtCaption(value)), td]);
            }
          } else {
            if (i !== null) td.dataset.row = i;  // a failed point: its detail says why
            td.append(el('div', { class: 'missing', text: i !== null ? 'failed' : 'none' }));
          }
          tr.append(td);
        }
        if (state.best && cells.length > 1) {
          const top = cells.reduce((a, b) => (better(b[0], a[0]) ? b : a));
          for (const [value, td] of cells) if (value === top[0]) {
            td.classList.add('best');
            td.querySelector('.cap').textContent = '★ ' + td.querySelector('.cap').textContent;
          }
        }
        table.append(tr);
      }
      section.append(table);
      fragment.append(section);
    }
    const grid = $('grid');
    grid.textContent = '';
    grid.append(fragment);
    onScreen.disconnect();
    for (const img of pending) onScreen.observe(img);
    const ms = performance.now() - start;
    window.viewerTimings.renders.push(ms);
    grid.dataset.renderMs = ms.toFixed(1);
  }
  function refresh() { renderControls(); renderGrid(); }
  // Images get their source as they come near the screen: a 1,000-image grid draws as fast as a small one.
  const onScreen = new IntersectionObserver(entries => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      entry.target.src = entry.target.dataset.src;
      onScreen.unobserve(entry.target);
    }
  }, { rootMargin: '600px' });

  $('grid').addEventListener('click', event => {
    const td = event.target.closest('td.cell');
    if (!td || td.dataset.row === undefined) return;
    const i = Number(td.dataset.row);
    if (event.shiftKey && D.images[i]) pick(i); else openDetail(i);
  });

  // ---------------------------------------------------------------- cell detail
  let detailRow = null;
  function detailTable(i) {
    const table = $('detail-table');
    table.textContent = '';
    const row = rows[i];
    const groups = [['axes', axisKeys], ['settings', D.detail.settings.filter(c => !axisKeys.includes(c))],
      ['metrics', D.detail.metrics], ['timings', D.detail.timings], ['identity', D.detail.identity],
      ['files', ['job', 'image']]];
    for (const [name, keys] of groups) {
      if (!keys.length) continue;
      table.append(el('tr', { class: 'group' }, el('th', { colSpan: 2, text: name })));
      for (const key of keys) table.append(el('tr', { 'data-key': key }, el('th', { text: key }), el('td', { text: fmt(row[key]) })));
    }
  }
  function openDetail(i) {
    detailRow = i;
    const image = D.images[i];
    $('detail-title').textContent = describe(i) || 'the image';
    const img = $('detail-img');
    if (image) {
      img.hidden = false;
      img.src = image.full;
      img.className = image.exact ? 'exact' : '';
      // small images enlarged by a whole factor (crisp pixels); large ones at most 512 px wide
      img.style.width = (image.w <= 192 ? image.w * Math.max(1, Math.floor(384 / image.w)) : Math.min(image.w, 512)) + 'px';
    } else { img.hidden = true; img.removeAttribute('src'); }
    detailTable(i);
    $('detail-command').textContent = D.commands[i] || '(no image: nothing to redraw)';
    const withAxis = $('with-axis');
    withAxis.textContent = '';
    for (const axis of axes) withAxis.append(el('option', { value: axis.key, text: axis.key }));
    withAxis.value = state.x || axisKeys[0] || '';
    fillWithValues();
    $('compare-with-tools').hidden = !axes.length || !image;
    $('set-a').disabled = $('set-b').disabled = !image;
    if (!$('detail').open) $('detail').showModal();
    drawSchedule();
  }
  function fillWithValues() {
    const select = $('with-value'), axis = axes.find(a => a.key === $('with-axis').value);
    select.textContent = '';
    if (!axis || detailRow === null) return;
    for (const value of axis.values) {
      if (valueKey(value) === valueKey(rows[detailRow][axis.key])) continue;
      select.append(el('option', { value: valueKey(value), text: fmt(value) }));
    }
  }
  $('with-axis').onchange = fillWithValues;
  $('compare-with').onclick = () => {
    const axis = $('with-axis').value, value = JSON.parse($('with-value').value || 'null');
    const spec = Object.fromEntries(axisKeys.map(a => [a, rows[detailRow][a]]));
    spec[axis] = value;
    const other = rowsAt(spec).find(j => D.images[j]);
    if (other === undefined) { $('compare-with').textContent = 'no such image'; return; }
    $('compare-with').textContent = 'compare';
    state.A = detailRow; state.B = other;
    $('detail').close();
    renderGrid();
    openCompare();
  };
  $('set-a').onclick = () => { state.A = detailRow; afterPick(); };
  $('set-b').onclick = () => { state.B = detailRow; afterPick(); };
  function afterPick() {
    $('detail').close();
    renderGrid();
    if (state.A !== null && state.B !== null) openCompare();
  }
  $('copy-command').onclick = async () => {
    const text = $('detail-command').textContent;
    try { await navigator.clipboard.writeText(text); } catch (err) {  // a page from file:// may not be allowed
      const range = document.createRange();
      range.selectNodeContents($('detail-command'));
      getSelection().removeAllRanges(); getSelection().addRange(range);
      document.execCommand('copy');
    }
    $('copy-command').textContent = 'copied';
    setTimeout(() => { $('copy-command').textContent = 'copy'; }, 1500);
  };
  for (const radio of document.querySelectorAll('input[name=schedule-view]')) radio.onchange = drawSchedule;
  function drawSchedule() {
    const target = $('detail-schedule');
    const schedule = detailRow === null ? null : D.jobs[D.row_job[detailRow]].schedule;
    target.textContent = schedule ? '' : 'no schedule.csv in this job';
    if (!schedule) return;
    const snr = document.querySelector('input[name=schedule-view]:checked').value === 'snr' && schedule.log_snr;
    const steps = numeric(rows[detailRow].steps) || schedule.step.length;
    const trace = snr
      ? { x: schedule.step.map(s => s / steps), y: schedule.log_snr, hovertemplate: '%{x:.2f} of steps: log-SNR %{y:.3f}<extra></extra>' }
      : { x: schedule.step, y: schedule.sigma, hovertemplate: 'step %{x}: sigma %{y:.4g}<extra></extra>' };
    const layout = {
      margin: { l: 55, r: 10, t: 10, b: 40 },
      xaxis: { title: { text: snr ? 'fraction of steps' : 'step' } },
      yaxis: { title: { text: snr ? 'log-SNR' : 'sigma' }, type: snr ? 'linear' : 'log' },
    };
    const name = rows[detailRow].scheduler;
    // after the dialog is drawn: the first chart of a page evaluates plotly.js
    setTimeout(() => withPlotly(P => P.newPlot(target, [Object.assign({ mode: 'lines+markers', name }, trace)], layout,
      { displaylogo: false, responsive: true })), 0);
  }

  // ---------------------------------------------------------------- A/B compare
  function pick(i) {
    if (state.A === null || state.B !== null) { state.A = i; state.B = null; renderGrid(); return; }
    state.B = i;
    renderGrid();
    openCompare();
  }
  const view = { s: 1, tx: 0, ty: 0, mode: 'side', flicker: null };
  const stage = $('compare-stage');
  const stageImages = () => stage.querySelectorAll('img');
  function applyView() {
    for (const img of stageImages()) img.style.transform = `translate(${view.tx}px, ${view.ty}px) scale(${view.s})`;
    stage.classList.toggle('crisp', view.s >= 1);
    stage.dataset.scale = view.s;
  }
  function activeViewport() { return view.mode === 'side' ? $('vp-a') : $('vp-b'); }
  function fit() {
    const image = D.images[state.A], box = activeViewport().getBoundingClientRect();
    let s = Math.min(box.width / image.w, box.height / image.h);
    if (s > 1) s = Math.floor(s);  // whole factors keep every pixel the same size
    view.s = s;
    view.tx = (box.width - image.w * s) / 2;
    view.ty = (box.height - image.h * s) / 2;
    applyView();
  }
  function zoomAt(factor, px, py) {
    const s = Math.min(64, Math.max(0.05, view.s * factor));
    view.tx = px - (px - view.tx) * (s / view.s);
    view.ty = py - (py - view.ty) * (s / view.s);
    view.s = s;
    applyView();
  }
  function centerZoom(factor) {
    const box = activeViewport().getBoundingClientRect();
    zoomAt(factor, box.width / 2, box.height / 2);
  }
  for (const vp of [$('vp-a'), $('vp-b')]) {
    vp.addEventListener('wheel', event => {
      event.preventDefault();
      const box = vp.getBoundingClientRect();
      zoomAt(event.deltaY < 0 ? 1.25 : 0.8, event.clientX - box.left, event.clientY - box.top);
    }, { passive: false });
    vp.addEventListener('pointerdown', event => {
      vp.setPointerCapture(event.pointerId);
      vp.classList.add('dragging');
      let last = [event.clientX, event.clientY];
      vp.onpointermove = move => {
        view.tx += move.clientX - last[0]; view.ty += move.clientY - last[1];
        last = [move.clientX, move.clientY];
        applyView();
      };
      vp.onpointerup = () => { vp.onpointermove = null; vp.classList.remove('dragging'); };
    });
  }
  function setMode(mode) {
    const refit = (view.mode === 'side') !== (mode === 'side');  // one pane or two: the viewport changed size
    view.mode = mode;
    stage.className = mode;
    for (const b of document.querySelectorAll('.modes button')) b.classList.toggle('active', b.dataset.mode === mode);
    clearInterval(view.flicker);
    view.flicker = null;
    const layer = stage.querySelector('.b-layer');
    layer.classList.remove('hidden');
    $('flicker-state').textContent = '';
    if (mode === 'flicker') {
      view.flicker = setInterval(() => {
        layer.classList.toggle('hidden');
        $('flicker-state').textContent = layer.classList.contains('hidden') ? 'showing A' : 'showing B';
      }, 500);
    }
    $('wipe').hidden = mode !== 'wipe';
    $('amp-tools').hidden = mode !== 'diff';
    applyWipe(); applyAmp();
    if (refit && $('compare').open) fit(); else applyView();
  }
  function applyWipe() {
    const p = Number($('wipe').value);
    stage.querySelector('.b-layer').style.clipPath = view.mode === 'wipe' ? `inset(0 0 0 ${p}%)` : '';
    stage.querySelector('.wipe-line').style.left = p + '%';
  }
  function applyAmp() {
    stage.querySelector('#vp-b .stack').style.filter = view.mode === 'diff' ? `brightness(${$('amp').value})` : '';
  }
  $('wipe').oninput = applyWipe;
  $('amp').onchange = applyAmp;
  for (const b of document.querySelectorAll('.modes button')) b.onclick = () => setMode(b.dataset.mode);
  $('zoom-fit').onclick = fit;
  $('zoom-1').onclick = () => { const box = activeViewport().getBoundingClientRect(); zoomAt(1 / view.s, box.width / 2, box.height / 2); };
  $('zoom-in').onclick = () => centerZoom(1.25);
  $('zoom-out').onclick = () => centerZoom(0.8);
  $('swap-ab').onclick = () => { [state.A, state.B] = [state.B, state.A]; renderGrid(); openCompare(); };
  function openCompare() {
    const a = D.images[state.A], b = D.images[state.B];
    const differ = axisKeys.filter(k => valueKey(rows[state.A][k]) !== valueKey(rows[state.B][k]));
    const same = axisKeys.filter(k => !differ.includes(k));
    $('compare-title').textContent = same.length ? describe(state.A, same) : 'A/B';
    $('label-a').textContent = describe(state.A, differ);
    $('label-b').textContent = describe(state.B, differ);
    for (const img of stage.querySelectorAll('.img-a')) { img.src = a.full; img.width = a.w; img.height = a.h; }
    for (const img of stage.querySelectorAll('.img-b')) { img.src = b.full; img.width = a.w; img.height = a.h; }
    if (!$('compare').open) $('compare').showModal();
    setMode(view.mode);
    fit();
  }

  // ---------------------------------------------------------------- dialogs, tabs
  for (const b of document.querySelectorAll('[data-close]')) b.onclick = () => $(b.dataset.close).close();
  $('compare').addEventListener('close', () => { clearInterval(view.flicker); view.flicker = null; });
  const drawn = {};
  function showTab(name) {
    for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('active', b.dataset.tab === name);
    for (const section of document.querySelectorAll('main > section')) section.hidden = section.id !== 'tab-' + name;
    if (name === 'charts' && !drawn.charts) { drawn.charts = true; renderCharts(); }
    if (name === 'table' && !drawn.table) { drawn.table = true; setupTable(); }
  }
  for (const b of document.querySelectorAll('#tabs button')) b.onclick = () => showTab(b.dataset.tab);

  function renderCharts() {
    const target = $('charts');
    const note = el('p', { class: 'hint', text: 'drawing the charts…' });
    target.append(note);
    setTimeout(() => withPlotly(P => {  // after the tab is drawn
      note.remove();
      for (const chart of D.charts) {
        const div = el('div', { class: 'chart', id: 'chart-' + chart.name });
        target.append(div);
        P.newPlot(div, chart.figure.data, chart.figure.layout, { displaylogo: false, responsive: true });
      }
    }), 0);
  }

  // ---------------------------------------------------------------- the results table
  const table = { sort: null, ascending: true, visible: new Set(D.table.shown), filters: {} };
  const tableColumns = () => ['thumbnail', ...D.table.shown, ...D.table.hidden].filter(c => c === 'thumbnail' || table.visible.has(c));
  function cellText(i, column) {
    const v = column === 'config' ? D.jobs[D.row_job[i]].config : rows[i][column];
    return v === null || v === undefined ? '' : typeof v === 'number' ? fmt(v) : String(v);
  }
  function matches(text, value, test) {
    const m = /^(<=|>=|<|>|=)\s*(.*)$/.exec(test);
    if (!m) return text.toLowerCase().includes(test.toLowerCase());
    const n = numeric(value), target = Number(m[2]);
    if (m[1] === '=') return isNaN(target) || n === null ? text === m[2] : n === target;
    if (n === null || isNaN(target)) return false;
    return { '<': n < target, '>': n > target, '<=': n <= target, '>=': n >= target }[m[1]];
  }
  function setupTable() {
    const list = $('column-list');
    for (const c of [...D.table.shown, ...D.table.hidden]) {
      const box = el('input', { type: 'checkbox', checked: table.visible.has(c), 'data-column': c });
      box.onchange = () => { if (box.checked) table.visible.add(c); else table.visible.delete(c); renderTable(); };
      list.append(el('label', {}, box, ' ' + c), el('br'));
    }
    $('table-filter').oninput = renderTable;
    renderTable();
  }
  function renderTable() {
    const cols = tableColumns();
    const head = $('results').tHead;
    head.textContent = '';
    const names = el('tr'), inputs = el('tr', { class: 'filters' });
    for (const c of cols) {
      const th = el('th', { text: c, 'data-column': c, class: table.sort === c ? (table.ascending ? 'asc' : 'desc') : '' });
      if (c !== 'thumbnail') th.onclick = () => { table.ascending = table.sort === c ? !table.ascending : true; table.sort = c; renderTable(); };
      names.append(th);
      const input = el('input', { value: table.filters[c] || '', 'data-column': c });
      input.oninput = () => { table.filters[c] = input.value; renderBody(); };
      inputs.append(el('th', {}, c === 'thumbnail' ? '' : input));
    }
    head.append(names, inputs);
    renderBody();
  }
  function renderBody() {
    const cols = tableColumns();
    const everywhere = $('table-filter').value.trim().toLowerCase();
    let order = rows.map((_, i) => i).filter(i => {
      for (const [c, test] of Object.entries(table.filters)) {
        if (test && cols.includes(c) && !matches(cellText(i, c), rows[i][c], test.trim())) return false;
      }
      return !everywhere || cols.some(c => c !== 'thumbnail' && cellText(i, c).toLowerCase().includes(everywhere));
    });
    if (table.sort) {
      const c = table.sort, sign = table.ascending ? 1 : -1;
      order.sort((i, j) => {
        const a = numeric(rows[i][c]), b = numeric(rows[j][c]);
        if (a !== null && b !== null) return sign * (a - b || 0);
        if (a !== null || b !== null) return a !== null ? -1 : 1;  // numbers before text and blanks
        return sign * cellText(i, c).localeCompare(cellText(j, c));
      });
    }
    const html = order.map(i => '<tr data-row="' + i + '">' + cols.map(c => {
      if (c === 'thumbnail') {
        const image = D.images[i];
        return '<td>' + (image ? `<img loading="lazy" src="${image.thumb}" class="${image.exact ? 'exact' : ''}" alt="">` : '') + '</td>';
      }
      const text = cellText(i, c);
      return `<td title="${esc(text)}">${esc(text)}</td>`;
    }).join('') + '</tr>').join('');
    $('results').tBodies[0].innerHTML = html;
    $('table-count').textContent = `${order.length} of ${rows.length} rows`;
  }
  $('results').tBodies[0].addEventListener('click', event => {
    if (event.target.tagName === 'IMG') openDetail(Number(event.target.closest('tr').dataset.row));
  });

  // ---------------------------------------------------------------- start
  setupStaticControls();
  document.documentElement.style.setProperty('--cell', state.cell + 'px');
  refresh();
  requestAnimationFrame(() => { window.viewerTimings.firstFrame = performance.now(); });
  window.viewer = { state, rows, setRole, refresh, openDetail, openCompare, pick, showTab, setMode };
})();
