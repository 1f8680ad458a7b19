"""The Workbench's panels: pure functions from the model's state to HTML (no ipywidgets here).

Every panel is a `<div class="kvmlab-panel kvmlab-NAME">`; values a browser test looks for
carry their own classes (`kvmlab-exit-reason`, `kvmlab-io-port`). Changed values get
`kvmlab-changed`, the instruction at rip `kvmlab-current`.
"""

from __future__ import annotations

from html import escape

from kvmlab.workbench.model import Workbench

STYLE = """<style>
.kvmlab-panel { font-family: monospace; font-size: 12px; margin: 2px 0; }
.kvmlab-panel table { border-collapse: collapse; }
.kvmlab-panel td, .kvmlab-panel th { padding: 0 6px; text-align: left; }
.kvmlab-changed { background: #ffe08a; }
.kvmlab-current { background: #b8e0ff; font-weight: bold; }
.kvmlab-error { color: #b00020; }
.kvmlab-flag { color: #b05000; }
</style>"""


def _panel(name: str, title: str, body: str) -> str:
    return f'<div class="kvmlab-panel kvmlab-{name}"><b>{escape(title)}</b>{body}</div>'


def _cls(changed: bool) -> str:
    return ' class="kvmlab-changed"' if changed else ""


def registers(wb: Workbench) -> str:
    """General registers, then segments and control registers; changed ones highlighted."""
    cells = [
        f"<td>{name}</td><td{_cls(changed)}>{value:#018x}</td>"
        for name, value, changed in wb.registers()
    ]
    rows = "".join(f"<tr>{''.join(cells[i : i + 3])}</tr>" for i in range(0, len(cells), 3))
    seg_rows = []
    for name, fields, changed in wb.segments():
        shown = " ".join(f"{k}={v:#x}" for k, v in fields.items())
        seg_rows.append(f"<tr{_cls(changed)}><td>{name}</td><td>{shown}</td></tr>")
    body = f"<table>{rows}</table><table>{''.join(seg_rows)}</table>"
    return _panel("registers", "registers (kvm_regs, kvm_sregs)", body)


def kvm_run(wb: Workbench) -> str:
    """struct kvm_run field by field: offset, size, value; the active union member; raw bytes."""
    view = wb.kvm_run()
    if view is None:
        return _panel("kvm-run", "struct kvm_run", "<p>no exit yet</p>")
    changed = set(view.changed)
    rows = []
    for f in view.header + view.member_fields:
        cls = ' class="kvmlab-changed"' if f.name in changed else ""
        value = escape(f.text())
        if f.name == "exit_reason":
            value = f'<span class="kvmlab-exit-reason">{value} KVM_EXIT_{view.reason_name}</span>'
        elif f.name == "io.port":
            value = f'<span class="kvmlab-io-port">{value}</span>'
        rows.append(f"<tr{cls}><td>+{f.offset:#05x}</td><td>{f.size}</td><td>{f.name}</td>"
                    f"<td>{value}</td></tr>")  # fmt: skip
    parts = [
        f"<p>exit: <b>KVM_EXIT_{view.reason_name}</b>; active union member: "
        f"<b>{view.member or '(none)'}</b></p>",
        "<table><tr><th>offset</th><th>size</th><th>field</th><th>value</th></tr>",
        "".join(rows),
        "</table>",
        f"<p>header bytes: {view.header_bytes.hex(' ')}</p>",
    ]
    if view.member_bytes:
        parts.append(f"<p>{view.member} bytes: {view.member_bytes.hex(' ')}</p>")
    if view.data_offset is not None:
        parts.append(
            f"<p>io.data_offset {view.data_offset:#x} &rarr; (char *)run + {view.data_offset:#x}"
            f" (the PIO page): <b>{view.data.hex(' ')}</b> {escape(repr(view.data))}</p>"
        )
    parts.append(f"<p>changed since the exit before: {escape(', '.join(view.changed)) or '-'}</p>")
    return _panel("kvm-run", "struct kvm_run", "".join(parts))


def exit_bars(counts: dict[str, int], width: int = 240) -> str:
    """Per-reason exit counts as a small horizontal bar plot in SVG."""
    if not counts:
        return "<p>no exits yet</p>"
    top = max(counts.values())
    bars = []
    for i, (reason, n) in enumerate(sorted(counts.items(), key=lambda kv: -kv[1])):
        w = max(1, int(width * n / top))
        y = i * 16
        bars.append(
            f'<text x="0" y="{y + 12}" font-size="11">{escape(reason)}</text>'
            f'<rect x="110" y="{y + 2}" width="{w}" height="12" fill="#4a90d9"/>'
            f'<text x="{114 + w}" y="{y + 12}" font-size="11">{n}</text>'
        )
    height = 16 * len(counts)
    return (
        f'<svg class="kvmlab-exit-bars" width="{width + 160}" height="{height}">'
        + "".join(bars)
        + "</svg>"
    )


def exits(wb: Workbench, last: int = 20) -> str:
    """The exit log as a timeline (newest last) and the per-reason counts as bars."""
    rows = []
    for r in wb.exit_timeline(last):
        where = "" if r.address is None else f"{r.address:#x}"
        rip = "" if r.rip is None else f"{r.rip:#x}"
        data = r.data.hex(" ") if r.data else r.detail
        rows.append(
            f"<tr><td>{r.seq}</td><td>{escape(r.reason)}</td><td>{rip}</td><td>{where}</td>"
            f"<td>{r.direction or ''}</td><td>{escape(data[:40])}</td></tr>"
        )
    table = "<table><tr><th>seq</th><th>exit</th><th>rip</th><th>port/addr</th><th>dir</th>"
    table += f"<th>data</th></tr>{''.join(rows)}</table>"
    return _panel("exits", "exit log", exit_bars(wb.exit_counts()) + table)


def memory(wb: Workbench, start: int | None = None, length: int = 0x80) -> str:
    """Guest RAM as hex and ASCII, bytes changed by the last action highlighted; the slot map."""
    lines = []
    for address, data, changed in wb.memory(start, length):
        hexes = " ".join(
            f'<span class="kvmlab-changed">{b:02x}</span>' if i in changed else f"{b:02x}"
            for i, b in enumerate(data)
        )
        text = escape("".join(chr(b) if 32 <= b < 127 else "." for b in data))
        lines.append(f"{address:08x}  {hexes}  {text}")
    runs = ", ".join(f"{gpa:#x}+{n}" for gpa, n in wb.changed_ranges()) or "-"
    slots = "".join(
        f"<tr><td>{kind}</td><td>{start_:#x}</td><td>{size:#x}</td><td>{escape(what)}</td></tr>"
        for kind, start_, size, what in wb.memory_map()
    )
    body = (
        f"<pre>{chr(10).join(lines)}</pre><p>changed by the last action: {runs}</p>"
        f"<table><tr><th>map</th><th>start</th><th>size</th><th>what</th></tr>{slots}</table>"
    )
    return _panel("memory", "guest memory", body)


def disassembly(wb: Workbench) -> str:
    """Instructions around rip, the current one marked, each with its source line."""
    rows = []
    source = wb.source.splitlines()
    for insn, current, line in wb.disassembly():
        text = escape(source[line - 1].strip()) if line and line <= len(source) else ""
        mark = "&rarr;" if current else ""
        rows.append(
            f"<tr{' class=kvmlab-current' if current else ''}><td>{mark}</td>"
            f"<td>{insn.address:#x}</td><td>{insn.bytes.hex(' ')}</td>"
            f"<td>{escape(insn.mnemonic)} {escape(insn.op_str)}</td>"
            f"<td>{'line ' + str(line) if line else ''}</td><td>{text}</td></tr>"
        )
    return _panel("disassembly", "disassembly at rip", f"<table>{''.join(rows)}</table>")


def listing(wb: Workbench) -> str:
    """The assembler's listing beside the source; flagged lines and the error line marked."""
    error_line = wb.asm_error.line if wb.asm_error is not None else None
    current = wb.current_line()
    rows = []
    for line, text, address, data, flag in wb.listing():
        cls = " class=kvmlab-current" if line == current else ""
        note = f'<span class="kvmlab-flag">{escape(flag)}</span>' if flag else ""
        where = f"{address:#06x}" if data else ""
        rows.append(
            f"<tr{cls}><td>{line}</td><td>{where}</td><td>{data.hex(' ')}</td>"
            f"<td>{escape(text)}</td><td>{note}</td></tr>"
        )
    if error_line is not None and wb.asm_error is not None:
        rows.append(
            f'<tr class="kvmlab-error"><td>{error_line}</td><td></td><td></td>'
            f"<td>{escape(wb.asm_error.text)}</td><td>{escape(wb.asm_error.message)}</td></tr>"
        )
    return _panel("listing", "listing", f"<table>{''.join(rows)}</table>")


def trace(wb: Workbench) -> str:
    """The kernel call path of the last action, collapsible."""
    text = wb.view.trace or (
        "(the host kernel's call path is not visible from userspace)"
        if wb.backend == "host"
        else "(no kernel calls: a Run is not traced)"
    )
    n = text.count("\n-> ") + text.startswith("-> ")
    return _panel(
        "trace",
        "kernel call path",
        f"<details><summary>{escape(wb.view.action)}: {n} top-level calls</summary>"
        f"<pre>{escape(text)}</pre></details>",
    )


def serial(wb: Workbench) -> str:
    return _panel(
        "serial", "serial console (COM1 and port 0xe9)", f"<pre>{escape(wb.serial_text())}</pre>"
    )


def errors(wb: Workbench) -> str:
    items = "".join(f'<li class="kvmlab-error">{escape(str(e))}</li>' for e in wb.errors)
    return _panel("errors", f"errors ({len(wb.errors)})", f"<ul>{items}</ul>")


def status(wb: Workbench) -> str:
    m = wb.machine
    state = m.state if m is not None else "not assembled"
    running = " (running)" if wb.running else ""
    return _panel(
        "status",
        "",
        f"{wb.backend} /dev/kvm, {wb.mode} mode, machine {state}{running}, "
        f"last action: {escape(wb.view.action or '-')}, history {len(wb.history)}",
    )


PANELS = {
    "registers": registers,
    "kvm_run": kvm_run,
    "exits": exits,
    "memory": memory,
    "disassembly": disassembly,
    "listing": listing,
    "trace": trace,
    "serial": serial,
    "errors": errors,
    "status": status,
}
LIVE = ("exits", "serial", "errors", "status")  # what Run mode refreshes (no vCPU ioctls)


def render_all(wb: Workbench, names: tuple[str, ...] | None = None) -> dict[str, str]:
    """{panel name: HTML} for `names` (default: every panel)."""
    return {name: PANELS[name](wb) for name in names or tuple(PANELS)}
