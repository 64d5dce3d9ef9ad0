"""[5] memory per stored message (MEMORY USAGE) against the JSON payload, for convstate and
the peers."""

from __future__ import annotations

import json
import statistics
from typing import Any

from bench.core import MEMORY_MESSAGES, PREFILL_BATCH, SHORT_TEXT, TEXT, chat, usage
from bench.data import rpush_many
from bench.peers import ChatMemoryBuffer, ChatMessage, RedisSession
from bench.report import n, table


class MemoryMeasure:
    """Measures memory (a mixin of :class:`bench.main.Bench`)."""

    def memory(self) -> None:
        admin, loop = self.admin, self.loop
        store = self.store(prefix="m")
        araw = self.araw()
        n = MEMORY_MESSAGES
        rows: dict[str, dict[str, Any]] = {}
        for size, text in (("78-token message", TEXT), ("short message", SHORT_TEXT)):
            msgs = [chat(i, text) for i in range(n)]
            payload = sum(len(json.dumps(m, ensure_ascii=False).encode()) for m in msgs) / n
            sid = f"mem-{len(text)}"
            store.delete_session(sid)
            store.create_session(sid)
            for i in range(0, n, PREFILL_BATCH):
                store.append_many(sid, msgs[i : i + PREFILL_BATCH])
            keys = store.ops.session_keys(sid)
            record = statistics.mean(len(x) for x in admin.lrange(keys.msgs, 0, -1))
            parts = {
                "msgs list": usage(admin, keys.msgs),
                "ids hash": usage(admin, keys.ids),
                "ids log": usage(admin, keys.idlog),
                "meta hash": usage(admin, keys.meta),
            }
            row: dict[str, Any] = {
                "payload": payload,
                "record": record,
                "convstate": parts,
            }
            rpush_many(admin, f"raw-{sid}", [json.dumps(m, ensure_ascii=False) for m in msgs])
            row["RPUSH of the JSON payload"] = {"list": usage(admin, f"raw-{sid}")}
            if RedisSession is not None:
                session = RedisSession(sid, redis_client=araw, key_prefix="agm")
                loop.run_until_complete(session.add_items(list(msgs)))
                row["openai-agents RedisSession"] = {
                    "messages list": usage(admin, session._messages_key),
                    "session hash": usage(admin, session._session_key),
                }
            if ChatMemoryBuffer is not None:
                rpush_many(admin, f"li-{sid}", [ChatMessage(**m).model_dump_json() for m in msgs])
                row["LlamaIndex RedisChatStore"] = {"list": usage(admin, f"li-{sid}")}
            rows[size] = row
            total = sum(parts.values()) / n
            print(
                f"  [5] {size}: payload {payload:.0f} B, convstate {total:.0f} B/message "
                f"(list {parts['msgs list'] / n:.0f}, "
                f"ids {(parts['ids hash'] + parts['ids log']) / n:.0f}, "
                f"meta {parts['meta hash'] / n:.1f})",
                flush=True,
            )
        self.admin.flushdb()
        self.r["memory"] = rows


class MemoryReport:
    """The report's memory section (a mixin of :class:`bench.main.Report`)."""

    def memory(self) -> None:
        import matplotlib.pyplot as plt

        mem = self.r["memory"]
        rows = []
        for size, row in mem.items():
            payload = row["payload"]
            for name, parts in row.items():
                if name in ("payload", "record"):
                    continue
                total = sum(parts.values()) / MEMORY_MESSAGES
                detail = ", ".join(f"{k} {v / MEMORY_MESSAGES:.1f}" for k, v in parts.items())
                rows.append(
                    [
                        size,
                        name,
                        f"{payload:.0f}",
                        f"{total:.0f}",
                        f"{total / payload:.2f}x",
                        f"{total - payload:.0f}",
                        detail,
                    ]
                )
        self.add(
            "## 5. Memory per message\n\n"
            f"MEMORY USAGE (SAMPLES 0) of every key of a {n(MEMORY_MESSAGES)}-message session, "
            "divided by the messages, against the message's JSON payload "
            '(`{"role": ..., "content": ...}`). convstate stores a record '
            f"(`tokens`, `role`, content, `id`, `kind`, `ts`: "
            f"{mem[next(iter(mem))]['record']:.0f} bytes for the 78-token message) in the list "
            "and the message id in a set (retry dedupe).\n\n"
            + table(
                [
                    "message",
                    "store",
                    "payload B",
                    "bytes / message",
                    "x payload",
                    "overhead B",
                    "by key (B / message)",
                ],
                rows,
            )
            + "\n\n"
            + self.image("memory.png", "memory per message")
        )
        fig, axes = plt.subplots(1, len(mem), figsize=(13, 4.8))
        for ax, (size, row) in zip(axes, mem.items(), strict=True):
            names = [k for k in row if k not in ("payload", "record")]
            seen: set[str] = set()
            for i, name in enumerate(names):
                bottom = 0.0
                for part, value in row[name].items():
                    kind = (
                        "message ids (hash + log)"
                        if "ids" in part
                        else "meta / session hash"
                        if "hash" in part
                        else "messages (list)"
                    )
                    color = {"messages (list)": "C0", "message ids (set)": "C1"}.get(kind, "C2")
                    per = value / MEMORY_MESSAGES
                    ax.bar(
                        i,
                        per,
                        bottom=bottom,
                        color=color,
                        alpha=0.85,
                        label=None if kind in seen else kind,
                    )
                    seen.add(kind)
                    bottom += per
                ax.text(i, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
            ax.axhline(row["payload"], color="black", ls="--", lw=1, label="JSON payload")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([nm.replace(" ", "\n", 1) for nm in names], fontsize=8)
            ax.set_ylabel("bytes per message")
            ax.set_title(size)
            ax.legend(fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"Redis memory per message at {n(MEMORY_MESSAGES)} messages")
        fig.tight_layout()
        self.savefig(fig, "memory.png")
