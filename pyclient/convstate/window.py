"""read.lua's window rule over a MULTI snapshot, so records never travel through Lua.

``read.lua`` walks back from the newest record inside Redis, moving every record it looks at
through Lua (about 0.8 us each, ten times what a plain LRANGE costs). The fast read instead
sends, inside one MULTI, ``HMGET`` of the session's counters, ``LLEN``, an ``LRANGE`` of the
first records (the head) and an ``LRANGE`` of the newest ones, then cuts the window here with
exactly read.lua's rule: the head (leading system messages and the running summary) always,
then the newest records while they fit the budget, then no tool result at the start. Each
record's cost comes from the ``{"tokens":N,"role":"..."`` prefix every convstate record starts
with. :func:`cut` answers ``None`` whenever the snapshot cannot decide the answer the way
read.lua would (a record without that prefix, a head or window longer than what was fetched,
counters that disagree with the list), and the client then runs read.lua itself: it stays the
authoritative read. tests/test_window.py checks on a real server, over random histories, that
both give the same answer.

Pure: no I/O.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from operator import itemgetter
from typing import Any, NamedTuple

import msgspec

from convstate.keys import SessionKeys

#: The prefix every record convstate writes starts with (read.lua's pattern
#: ``^{"tokens":(%d+),"role":"(%a+)"``; ``%a`` is an ASCII letter in the C locale Redis runs).
_COST = re.compile(rb'\{"tokens":([0-9]+),"role":"([A-Za-z]+)"')
#: The same for a client that decodes replies to str (``decode_responses=True``).
_COST_STR = re.compile(r'\{"tokens":([0-9]+),"role":"([A-Za-z]+)"')
#: Token counts above this go to read.lua: past 2**53 Lua's double arithmetic rounds, and the
#: two rules could disagree at the edge.
_MAX_FAST_TOKENS = 2**52
#: Head records fetched when nothing is known about a session (a system message and a summary).
DEFAULT_HEAD_GUESS = 2
#: Records kept in hand beyond the last window of a session, for the messages appended since.
TAIL_MARGIN = 4


class Cut(NamedTuple):
    """What read.lua would return: the records to send, their tokens, and what was needed.

    ``small`` is read.lua's SMALL (the budget cannot hold the head): ``records`` is then empty
    and ``used`` is what the head and the priming need. ``walked`` is how many of the newest
    records the walk looked at, and ``head_count`` the session's, so that the next read of the
    session fetches enough (see :func:`tail_size`).
    """

    small: bool
    records: list[bytes | str]
    used: int
    budget: int
    head_count: int
    walked: int


def snapshot_commands(keys: SessionKeys, head_guess: int, tail: int) -> list[tuple[str | int, ...]]:
    """The commands of a read snapshot, to run inside MULTI (after an append, if any)."""
    return [
        ("HMGET", keys.meta, "token_limit", "head_count", "message_count"),
        ("LLEN", keys.msgs),
        ("LRANGE", keys.msgs, 0, head_guess - 1),
        ("LRANGE", keys.msgs, -tail, -1),
    ]


def tail_size(budget: int | None, hint: tuple[int, int] | None, appended: int) -> int:
    """How many of the newest records to fetch: the last window's walk of this session plus
    what was appended since, or, for a session not read before, an estimate from the budget
    (a miss costs one more round trip, to read.lua)."""
    if hint is not None:
        return hint[1] + appended + TAIL_MARGIN
    if budget is None:
        return 64
    return min(max(budget // 32, 16), 512)


def _int(value: Any) -> int | None:
    """A counter as read.lua's ``tonumber`` reads it, when that is an exact int; else None."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _cost(raw: bytes | str) -> tuple[int, bool] | None:
    """A record's tokens and whether it is a tool result; None: read.lua must decide."""
    match = _COST.match(raw) if type(raw) is bytes else _COST_STR.match(str(raw))
    if match is None:
        return None
    tokens = int(match[1])
    if tokens > _MAX_FAST_TOKENS:
        return None
    return tokens, match[2] in (b"tool", "tool")


#: Token counts as one JSON array of the digits the prefix matched (one C call for them all).
_INTS = msgspec.json.Decoder(list[int])
_GROUP_1 = itemgetter(1)


def _costs(records: list[bytes | str]) -> tuple[list[int], list[Any]] | None:
    """Each record's tokens and its prefix match (group 2: the role), or None if any record
    lacks the prefix (read.lua must decode it). Per record only the C-level prefix match: the
    counts are parsed as one JSON array (a count with leading zeros, which JSON refuses,
    is parsed by ``int`` as read.lua's ``tonumber`` reads it)."""
    if not records:
        return [], []
    pattern: Any = _COST if type(records[0]) is bytes else _COST_STR
    matches = list(map(pattern.match, records))
    if None in matches:
        return None
    digits: Any = list(map(_GROUP_1, matches))
    try:
        tokens = _INTS.decode(
            b"[%b]" % b",".join(digits)
            if type(digits[0]) is bytes
            else "[" + ",".join(digits) + "]"
        )
    except (msgspec.DecodeError, msgspec.ValidationError):
        tokens = list(map(int, digits))
    return tokens, matches


def cut(
    meta: Sequence[Any],
    llen: int,
    head_part: Sequence[bytes | str],
    tail_part: Sequence[bytes | str],
    budget: int | None,
    priming: int,
) -> Cut | None:
    """read.lua's answer from a snapshot, or None when the snapshot cannot give it.

    ``meta`` is the HMGET of token_limit, head_count and message_count (the caller has
    checked that the session exists: token_limit is set); ``head_part`` the LRANGE of the
    first records; ``tail_part`` the LRANGE of the newest; ``budget`` the caller's (None: the
    session's token limit).
    """
    limit, head_count, total = _int(meta[0]), _int(meta[1] or 0), _int(meta[2] or 0)
    if limit is None or head_count is None or total is None:
        return None
    if llen != total or head_count > len(head_part) or head_count > total:
        return None  # counters that disagree with the list (keys mid-expiry): read.lua decides
    if budget is None:
        budget = limit
    used = priming
    head = list(head_part[:head_count])
    for raw in head:
        cost = _cost(raw)
        if cost is None:
            return None
        used += cost[0]
    if used > budget:
        return Cut(True, [], used, budget, head_count, 0)
    # Records at indices [0, len(head_part)) and [total - len(tail_part), total) are in hand:
    # the candidates are the in-hand records after the head, contiguous up to the newest.
    tail_start = total - len(tail_part)
    if len(head_part) >= tail_start:  # everything after the head is in hand
        candidates = [
            *head_part[head_count:tail_start],
            *tail_part[max(0, head_count - tail_start) :],
        ]
        complete = True
    else:
        candidates = list(tail_part[max(0, head_count - tail_start) :])
        complete = tail_start <= head_count
    candidates.reverse()  # newest first, as read.lua walks
    costs = _costs(candidates)
    if costs is None:
        return None
    tokens, matches = costs
    # read.lua takes records while they fit: the longest prefix whose running sum fits.
    sums = list(accumulate(tokens))
    if sums and sums[-1] > _MAX_FAST_TOKENS:
        return None  # counts this large go to read.lua (see _MAX_FAST_TOKENS)
    fits = bisect_right(sums, budget - used)
    if fits == len(candidates) and not complete:
        return None  # the window may reach past what was fetched
    walked = min(fits + 1, len(candidates))
    # A window that starts with tool results lost their tool call: drop them.
    last = fits
    while last > 0 and matches[last - 1][2] in (b"tool", "tool"):
        last -= 1
    if last:
        used += sums[last - 1]
    picked = candidates[:last]
    picked.reverse()
    return Cut(False, head + picked, used, budget, head_count, walked)
