"""How the run is shown: plain progress lines, or the live view (rich), then the verification."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol, TextIO

from convstate.demo.checks import DemoResult
from convstate.demo.view import DemoView, plural

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

RICH_HINT = (
    "the live view needs rich: pip install 'convstate[embedded]' (or pip install rich); "
    "showing plain progress instead"
)


class Reporter(Protocol):
    """Shows the run: :meth:`start`, :meth:`update` (often), :meth:`stop`, :meth:`summary`."""

    def start(self, view: DemoView) -> None: ...

    def update(self, view: DemoView) -> None: ...

    def stop(self, view: DemoView) -> None: ...

    def summary(self, result: DemoResult) -> None: ...


def _headline(view: DemoView) -> str:
    o = view.options
    return (
        f"{plural(len(view.sessions), 'session')}, "
        f"{plural(o.writer_count, 'writer process', 'writer processes')}, "
        f"{plural(o.turns, 'exchange')} each, token limit {o.token_limit:,}, "
        f"{view.summarizer} summarizer, {view.engine}, keys {view.prefix}:*"
    )


def _status(view: DemoView) -> str:
    return (
        f"{view.phase}: {plural(view.messages, 'message')} appended, "
        f"{plural(view.compactions, 'compaction')}, {view.tokens_saved:,} tokens saved, "
        f"queue {view.queued}, running {view.running}"
    )


class PlainReporter:
    """Progress as plain lines: compactions as they happen, a status line every few seconds."""

    def __init__(self, stream: TextIO, *, every: float = 2.0) -> None:
        self.stream = stream
        self.every = every
        self._printed = 0
        self._last = 0.0

    def _line(self, at: float, text: str) -> None:
        print(f"[{at:5.1f}s] {text}", file=self.stream, flush=True)

    def start(self, view: DemoView) -> None:
        print(f"convstate demo: {_headline(view)}", file=self.stream, flush=True)

    def update(self, view: DemoView) -> None:
        for entry in view.log[self._printed :]:
            self._line(entry.at, entry.text)
        self._printed = len(view.log)
        if view.elapsed - self._last >= self.every:
            self._last = view.elapsed
            self._line(view.elapsed, _status(view))

    def stop(self, view: DemoView) -> None:
        self.update(view)
        self._line(view.elapsed, _status(view))

    def summary(self, result: DemoResult) -> None:
        print("\nverification:", file=self.stream)
        width = max(len(c.name) for c in result.checks)
        for check in result.checks:
            mark = "PASS" if check.passed else "FAIL"
            print(f"  {mark}  {check.name:<{width}}  {check.detail}", file=self.stream)
        print(f"\n{_verdict(result)}", file=self.stream, flush=True)


def _verdict(result: DemoResult) -> str:
    failed = sum(1 for c in result.checks if not c.passed)
    if failed:
        return f"FAIL: {failed} of {len(result.checks)} checks failed"
    return f"PASS: all {len(result.checks)} checks passed"


_STATE_STYLE = {"idle": "dim", "queued": "yellow", "running": "bold cyan", "dead": "bold red"}


def _bar(tokens: int, limit: int) -> RenderableType:
    """``tokens`` against ``limit``: green, yellow from 80 %, red once over the limit."""
    from rich.progress_bar import ProgressBar

    ratio = tokens / limit if limit else 0.0
    return ProgressBar(
        total=limit,
        completed=min(tokens, limit),
        complete_style="green" if ratio < 0.8 else "yellow",
        finished_style="bold red",
        style="grey30",
    )


#: Widest the view gets; the token bars take what the other columns leave.
MAX_VIEW_WIDTH = 110


def render_view(view: DemoView, *, width: int = 100, log_lines: int = 8) -> RenderableType:
    """The live view of ``view`` for a terminal ``width`` columns wide: a header, the sessions
    table (topics only from 100 columns), the queue counters and the last ``log_lines``
    compactions."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    o = view.options
    width = min(width, MAX_VIEW_WIDTH)
    header = Text.assemble(
        ("convstate demo", "bold"),
        "  ",
        (f"{view.elapsed:4.1f}s", "bold"),
        f" of {o.duration:.0f}s  ",
        (view.phase, "bold magenta"),
        f"\n{view.engine} · keys {view.prefix}:*\n",
        f"{plural(len(view.sessions), 'session')} · ",
        f"{plural(o.writer_count, 'writer process', 'writer processes')} · ",
        f"limit {o.token_limit:,} tokens · summarizer {view.summarizer}",
    )
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, width=width)
    table.add_column("session", style="bold", no_wrap=True)
    wide = width >= 100
    if wide:
        table.add_column("topic", style="dim", no_wrap=True)
    table.add_column("tokens / limit", ratio=1, min_width=8)
    table.add_column("", justify="right", no_wrap=True)
    table.add_column("msgs", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True, min_width=7)
    table.add_column("compactions", justify="right", no_wrap=True)
    for row in view.sessions.values():
        cells: list[RenderableType] = [row.session_id]
        if wide:
            cells.append(row.topic)
        cells += [
            _bar(row.tokens, row.token_limit),
            f"{row.tokens:,} / {row.token_limit:,}",
            f"{row.messages:,}",
            Text(row.state, style=_STATE_STYLE.get(row.state, "")),
            str(row.epoch),
        ]
        table.add_row(*cells)
    counters = Text.assemble(
        "queue depth ",
        (str(view.queued), "bold yellow" if view.queued else "bold"),
        " · running ",
        (str(view.running), "bold cyan" if view.running else "bold"),
        " · dead ",
        (str(view.dead), "bold red" if view.dead else "bold"),
        "\nappended ",
        (f"{view.messages:,}", "bold"),
        " messages · ",
        (str(view.compactions), "bold"),
        " compaction · " if view.compactions == 1 else " compactions · ",
        (f"{view.tokens_saved:,}", "bold green"),
        " tokens saved",
    )
    entries = view.log[-log_lines:]
    lines = Text("\n", no_wrap=True, overflow="ellipsis").join(
        Text.assemble((f"{e.at:5.1f}s ", "dim"), (e.text, e.style)) for e in entries
    )
    log_panel = Panel(
        lines if entries else Text("waiting for the first session to pass its limit…", "dim"),
        title="compactions",
        title_align="left",
        border_style="grey50",
        height=log_lines + 2,
        width=width,
    )
    return Group(Panel(header, border_style="blue", width=width), table, counters, log_panel)


def render_summary(result: DemoResult) -> RenderableType:
    """The verification as a rich table, with the verdict under it."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="verification", box=box.ROUNDED, title_style="bold", expand=False)
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail")
    for check in result.checks:
        mark = Text("PASS", "bold green") if check.passed else Text("FAIL", "bold red")
        table.add_row(check.name, mark, check.detail)
    return Group(table, Text(_verdict(result), "bold green" if result.passed else "bold red"))


class LiveReporter:
    """The live view (rich ``Live``), redrawn on every update; the summary as a table."""

    def __init__(self, console: Console) -> None:
        from rich.live import Live

        self.console = console
        self._live = Live(console=console, auto_refresh=False, transient=False)

    def start(self, view: DemoView) -> None:
        self._live.start()
        self.update(view)

    def update(self, view: DemoView) -> None:
        width, height = self.console.size
        # Fit the terminal: header, table, counters and panel borders take 13 lines + sessions.
        log_lines = max(3, min(12, height - 13 - len(view.sessions)))
        self._live.update(render_view(view, width=width, log_lines=log_lines), refresh=True)

    def stop(self, view: DemoView) -> None:
        self.update(view)
        self._live.stop()

    def summary(self, result: DemoResult) -> None:
        self.console.print(render_summary(result))


def make_reporter(stream: TextIO, *, live: bool) -> Reporter:
    """The live view if asked for, ``stream`` is a terminal and rich is installed; else plain
    progress (saying how to get the live view when only rich is missing)."""
    if live and stream.isatty():
        try:
            from rich.console import Console
        except ImportError:
            print(RICH_HINT, file=sys.stderr)
        else:
            return LiveReporter(Console(file=stream))
    return PlainReporter(stream)
