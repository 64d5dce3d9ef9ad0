"""The writer processes: :class:`Writer` appends to random sessions (single messages,
batches, tool-call groups, re-sends, bad input), retries the same ids on transient errors, and
logs what it sent and every acknowledgement to its JSON-lines ledger file;
:func:`writer_main` is the entry point of a writer process (multiprocessing, spawn)."""

from __future__ import annotations

import json
import random
import time
import traceback
from collections import Counter, defaultdict
from typing import Any, TextIO

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from convstate import ConversationStore
from convstate.errors import (
    InvalidMessageError,
    MemoryFullError,
    MessageTooLargeError,
    SessionNotFoundError,
)
from convstate.models import AppendResult
from tests.reliability.skewed import skew_clock
from tests.reliability.soak.config import WriterSpec, wall

#: Errors a writer retries with the same message: the server is unreachable, slow, loading
#: its AOF, or (during a failover) read-only.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    # At maxmemory (noeviction) an append is refused whole; the daemons free memory.
    MemoryFullError,
)


SENTENCES = (
    "We decided to book the Kyoto inn for April 3rd.",
    "Maria prefers quiet temples over crowded shrines.",
    "The budget is 4,000 euros for two people, flights excluded.",
    "Could you check the train from Tokyo to Kanazawa at 9:15?",
    "I will reserve the ryokan in Hakone for two nights.",
    "Tom is allergic to shellfish, so no sushi omakase please.",
    "The hike to Mount Takao takes about 3 hours.",
    "Let's visit Nara on Sunday and feed the deer.",
    "The JR pass costs 50,000 yen for seven days.",
    "We never want to take overnight buses again.",
    "Is the Philosopher's Path busy in the morning?",
    "Our flight lands at Haneda at 6:40 in the evening.",
    "Please keep the schedule relaxed on the last day.",
    "The museum in Kanazawa closes on Mondays.",
    "We agreed to spend two days in Takayama.",
    "Sounds good, thanks.",
)
CITIES = ("Tokyo", "Kyoto", "Osaka", "Nara", "Hakone", "Kanazawa", "Takayama")


def message_id(writer: int, seq: int) -> str:
    """The explicit id of a writer's ``seq``-th message: ``w<writer>-<seq>``."""
    return f"w{writer:02d}-{seq:07d}"


def parse_message_id(mid: str) -> tuple[int, int] | None:
    """(writer, seq) of an id made by :func:`message_id`, or None for any other id."""
    if not mid.startswith("w") or "-" not in mid:
        return None
    head, _, tail = mid.partition("-")
    if not head[1:].isdigit() or not tail.isdigit():
        return None
    return int(head[1:]), int(tail)


class Writer:
    """One writer's state: its store, its random choices, its ledger file.

    :func:`writer_main` runs one per process; tests may drive one in process with
    :meth:`step`.
    """

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.seq = 0
        self.log: TextIO = open(spec.log_path, "a", encoding="utf-8")
        self.store = ConversationStore.from_url(
            spec.url,
            token_limit=spec.token_limit,
            encoding=spec.encoding,
            prefix=spec.prefix,
            shards=spec.shards,
            max_message_bytes=spec.max_message_bytes,
            socket_timeout=spec.socket_timeout,
            socket_connect_timeout=max(0.5, spec.socket_timeout),
            # redis-py's own retries resend the same EVALSHA (the id makes that safe too);
            # the writer's loop below resends the same message.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), spec.client_retries),
        )
        #: Acknowledged messages of this writer per session (for deliberate re-sends).
        self.history: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.stats: Counter[str] = Counter()

    # -- ledger --------------------------------------------------------------------------------

    def emit(self, **record: Any) -> None:
        self.log.write(json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n")
        self.log.flush()

    def close(self) -> None:
        self.emit(k="done", t=wall(), stats=dict(self.stats))
        self.log.close()
        self.store.close()

    # -- messages ------------------------------------------------------------------------------

    def next_id(self) -> str:
        self.seq += 1
        return message_id(self.spec.index, self.seq)

    def text(self, mid: str) -> str:
        return f"[{mid}] " + " ".join(self.rng.sample(SENTENCES, self.rng.randint(1, 3)))

    def plain(self, role: str) -> dict[str, Any]:
        mid = self.next_id()
        return {"id": mid, "role": role, "content": self.text(mid)}

    def prefill(self, sid: str, tokens: int) -> None:
        """Append user/assistant pairs to ``sid`` until it holds ``tokens`` tokens (logged
        like every append), so that compactions start as soon as the soak does."""
        while True:
            result = self.send(sid, "many", [self.plain("user"), self.plain("assistant")])
            if result is None or result.token_count >= tokens:
                return

    def tool_group(self) -> list[dict[str, Any]]:
        """An assistant tool call (1-2 calls), its results, and sometimes the answer."""
        call_msg_id = self.next_id()
        calls = []
        results = []
        for j in range(self.rng.randint(1, 2)):
            call_id = f"call_{call_msg_id}_{j}"
            city = self.rng.choice(CITIES)
            day = self.rng.randint(1, 14)
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": "lookup_weather",
                        "arguments": json.dumps({"city": city, "day": day}),
                    },
                }
            )
            result_id = self.next_id()
            results.append(
                {
                    "id": result_id,
                    "role": "tool",
                    "tool_call_id": call_id,
                    "content": json.dumps(
                        {"city": city, "day": day, "temp_c": self.rng.randint(5, 25)}
                    ),
                }
            )
        group: list[dict[str, Any]] = [
            {"id": call_msg_id, "role": "assistant", "content": None, "tool_calls": calls},
            *results,
        ]
        if self.rng.random() < 0.5:
            group.append(self.plain("assistant"))
        return group

    # -- one operation -------------------------------------------------------------------------

    def send(
        self,
        sid: str,
        op: str,
        msgs: list[dict[str, Any]],
        *,
        expect: type[Exception] | None = None,
        log_messages: bool = True,
    ) -> AppendResult | None:
        """Append ``msgs`` (one atomic call), retrying the same ids on connection errors.

        With ``expect``, the call must fail with that error (bad input) and write nothing.
        """
        ids = [str(m["id"]) for m in msgs]
        self.emit(
            k="send",
            sid=sid,
            op=op,
            ids=ids,
            msgs=msgs if log_messages else None,
            t=wall(),
            reject=expect.__name__ if expect else None,
        )
        started = time.monotonic()
        tries = 0
        while True:
            tries += 1
            try:
                if op == "one" or op == "resend" or (op != "many" and len(msgs) == 1):
                    result = self.store.append(sid, msgs[0])
                else:
                    result = self.store.append_many(sid, msgs)
            except TRANSIENT_ERRORS as exc:
                self.stats[f"transient:{type(exc).__name__}"] += 1
                self._error(sid, op, ids, exc, transient=True)
                if tries >= self.spec.max_tries or (
                    time.monotonic() - started > self.spec.give_up_after
                ):
                    return self._give_up(sid, op, ids)
                time.sleep(min(0.2, 0.005 * 2 ** min(tries, 6)))
                continue
            except Exception as exc:
                if expect is not None and isinstance(exc, expect):
                    self.stats[f"rejected:{type(exc).__name__}"] += 1
                    self.emit(
                        k="reject", sid=sid, op=op, ids=ids, t=wall(), type=type(exc).__name__
                    )
                    return None
                # Anything else reached the caller: the soak counts it as a failure. A Redis
                # error (e.g. NOSCRIPT leaking through) is retried with the same id.
                self.stats["unexpected"] += 1
                self._error(sid, op, ids, exc, transient=False)
                if isinstance(exc, redis.RedisError) and tries < self.spec.max_tries:
                    time.sleep(0.05)
                    continue
                return self._give_up(sid, op, ids)
            self.emit(
                k="ack",
                sid=sid,
                op=op,
                ids=ids,
                t=wall(),
                stored=result.stored,
                tries=tries,
                resent=result.resent,
                tokens=result.token_count,
            )
            self.stats["acked_calls"] += 1
            self.stats["acked_messages"] += len(ids)
            if result.resent:
                self.stats["client_resent"] += 1
            if tries > 1 or result.resent:
                self.stats["acked_after_retry"] += 1
                if result.stored < len(ids):
                    self.stats["retry_deduplicated"] += 1
            if expect is not None:
                self.stats["bad_input_accepted"] += 1
            return result

    def _error(self, sid: str, op: str, ids: list[str], exc: Exception, *, transient: bool) -> None:
        """Log an error a call met (``transient``: one the writer retries by design)."""
        self.emit(
            k="err",
            sid=sid,
            op=op,
            ids=ids,
            t=wall(),
            type=type(exc).__name__,
            msg=str(exc)[: 200 if transient else 300],
            transient=transient,
        )

    def _give_up(self, sid: str, op: str, ids: list[str]) -> None:
        self.stats["gave_up"] += 1
        self.emit(k="giveup", sid=sid, op=op, ids=ids, t=wall())

    def step(self) -> None:
        rng = self.rng
        sid = rng.choice(self.spec.sessions)
        roll = rng.random()
        if roll < 0.50:
            msgs = [self.plain(rng.choice(("user", "assistant")))]
            op = "one"
        elif roll < 0.70:
            msgs = [self.plain(role) for role in ("user", "assistant", "user")[: rng.randint(2, 3)]]
            op = "many"
        elif roll < 0.84:
            msgs = self.tool_group()
            op = "tool"
        elif roll < 0.90 and any(self.history.values()):
            sid = rng.choice(sorted(s for s, h in self.history.items() if h))
            original = rng.choice(self.history[sid])
            result = self.send(sid, "resend", [dict(original)], log_messages=False)
            if result is not None:
                self.stats["resend_deduplicated" if result.stored == 0 else "resend_stored"] += 1
            return
        elif roll < 0.94:
            self.bad_batch(sid)
            return
        elif roll < 0.97:
            mid = self.next_id()
            big = {"id": mid, "role": "user", "content": "x" * (self.spec.max_message_bytes + 1)}
            self.send(sid, "big", [big], expect=MessageTooLargeError, log_messages=False)
            return
        else:
            missing = [self.plain("user")]
            self.send(self.spec.missing_session, "missing", missing, expect=SessionNotFoundError)
            return
        result = self.send(sid, op, msgs)
        if result is not None:
            history = self.history[sid]
            history.extend(msgs)
            del history[:-30]

    def bad_batch(self, sid: str) -> None:
        """A batch with one valid and one invalid message: nothing of it may be stored."""
        good = self.plain("user")
        bad_id = self.next_id()
        variant = self.rng.randrange(3)
        bad: dict[str, Any]
        if variant == 0:
            bad = {"id": bad_id, "role": "robot", "content": "beep"}
        elif variant == 1:
            bad = {"id": bad_id, "role": "tool", "content": "{}"}  # no tool_call_id
        else:
            bad = {"id": bad_id, "role": "user", "content": "hi", "extra": {1, 2}}  # not JSON
        self.send(sid, "bad", [good, bad], expect=InvalidMessageError, log_messages=False)

    # -- the loop ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Connect and load the tokenizer before the start signal."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.store.redis.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.store.counter.count_message({"role": "user", "content": "warm up"})

    def run(self, stop: Any) -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            self.step()
            self.stats["ops"] += 1
            next_at += self.rng.expovariate(self.spec.rate)
            now = time.monotonic()
            if next_at < now:  # behind (a fault held us up): do not burst to catch up
                next_at = now
            elif stop.wait(next_at - now):
                break


def writer_main(spec: WriterSpec, ready: Any, go: Any, stop: Any) -> None:
    """Entry point of a writer process (multiprocessing, spawn)."""
    skew_clock(spec.clock_skew)
    writer = Writer(spec)
    try:
        writer.warm_up()
        ready.put(spec.index)
        if not go.wait(300):
            return
        writer.run(stop)
    except BaseException:
        writer.emit(k="crash", t=wall(), tb=traceback.format_exc())
        raise
    finally:
        writer.close()
