"""``convstate demo``: concurrent chat sessions, the compaction daemon, and a checked result.

What runs:

* an engine: a private Redis/Valkey in a temporary directory (:class:`RedisServer`), or the
  server of ``--redis-url`` under a unique key prefix whose keys are deleted afterwards;
* ``writers`` **processes** (multiprocessing, spawn), each with its own synchronous
  :class:`ConversationStore`, appending scripted user/assistant exchanges (some with a tool
  call and its result) to its share of the sessions at a quick but chat-like pace. Every
  acknowledged append is reported back through a multiprocessing queue;
* the compaction :class:`Daemon`, in this process (extractive summarizer by default, or an
  OpenAI-compatible model), with ``archive=True`` so that folded originals are kept;
* a live view (rich) of each session's tokens against its limit, its state and epoch, the
  queue, and a log of compactions; or plain progress lines (``--no-live``, non-terminals).

It ends with a verification that is computed from what the writers acknowledged and what
Redis holds, not assumed: every acknowledged message is stored exactly once (in its session's
list or its archive), every session's ``token_count`` is the sum of its records' tokens, the
daemon's compactions match the sessions' epochs, and so on (:class:`Check`). Any failed check
makes ``convstate demo`` exit 1.

``rich`` draws the live view; without it the demo prints plain progress and says how to
install it. Everything else is convstate's own dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import multiprocessing
import queue
import random
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TextIO

import redis

from convstate.admin import Admin, Stats
from convstate.client import ConversationStore
from convstate.compactor import Outcome
from convstate.daemon import Daemon, DaemonSettings, Metrics, redact_url
from convstate.errors import ConfigurationError, ConvstateError
from convstate.keys import KeySchema
from convstate.summarizers import Summarizer
from convstate.tokens import default_encoding

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

    from rich.console import Console, RenderableType

__all__ = [
    "TOPICS",
    "Check",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "DemoView",
    "LiveReporter",
    "PlainReporter",
    "Reporter",
    "build_conversation",
    "render_view",
    "run_cli",
    "run_demo",
]

log = logging.getLogger(__name__)

RICH_HINT = (
    "the live view needs rich: pip install 'convstate[embedded]' (or pip install rich); "
    "showing plain progress instead"
)

#: Shards of the demo's key prefix (few: the demo has a handful of sessions).
DEMO_SHARDS = 16
#: Writers aim to finish their exchanges within this share of ``--duration`` ...
WRITE_SHARE = 0.5
#: ... and stop appending at this share, done or not.
WRITE_STOP_SHARE = 0.8
#: The daemon gets until this share to work off the queue; then everything stops.
SETTLE_SHARE = 0.95
#: Seconds the daemon may take to finish in-flight compactions when stopped.
DAEMON_GRACE = 5.0
POLL_INTERVAL = 0.2
TICK = 0.05
LOG_LIMIT = 10_000


class DemoError(ConvstateError):
    """The demo could not run (the daemon or the writers did not start)."""


# -- options -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoOptions:
    """What ``convstate demo`` runs. ``turns`` are user/assistant exchanges per session."""

    sessions: int = 6
    writers: int = 2
    turns: int = 40
    duration: float = 30.0
    token_limit: int = 1500
    encoding: str | None = None
    summarizer: str = "extractive"
    openai_base_url: str | None = None
    model: str | None = None
    redis_url: str | None = None

    def __post_init__(self) -> None:
        for name, low in (("sessions", 1), ("writers", 1), ("turns", 1), ("token_limit", 200)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, not {value!r}")
        if not self.duration >= 3:  # also refuses NaN
            raise ConfigurationError(f"duration must be at least 3 seconds, not {self.duration!r}")
        if self.summarizer not in ("extractive", "openai"):
            raise ConfigurationError("summarizer must be 'extractive' or 'openai'")

    @property
    def writer_count(self) -> int:
        """Writer processes actually started: never more than there are sessions."""
        return min(self.writers, self.sessions)

    def resolved_encoding(self) -> str:
        return self.encoding or default_encoding()

    def daemon_settings(self, redis_url: str, prefix: str) -> DaemonSettings:
        """The daemon's settings, its policy scaled to the token limit."""
        limit = self.token_limit
        return DaemonSettings(
            redis_url=redis_url,
            prefix=prefix,
            shards=DEMO_SHARDS,
            concurrency=4,
            lease=30.0,
            grace=DAEMON_GRACE,
            sweep_interval=1.0,
            max_attempts=3,
            backoff=0.5,
            http_port=-1,
            summarizer=self.summarizer,
            openai_base_url=self.openai_base_url,
            summary_timeout=20.0,
            encoding=self.resolved_encoding(),
            keep_recent_tokens=limit // 5,
            min_recent_messages=4,
            target_ratio=0.5,
            max_summary_tokens=max(32, limit // 5),
            archive=True,
            log_level="WARNING",
            summary_model=self.model or DaemonSettings.summary_model,
        )


# -- the scripted conversations ----------------------------------------------------------------


@dataclass(frozen=True)
class ToolTurn:
    """An exchange where the assistant calls a tool, gets its result, then answers."""

    question: str
    name: str
    arguments: Mapping[str, Any]
    result: Mapping[str, Any]
    answer: str


@dataclass(frozen=True)
class Topic:
    """One scripted conversation: question/answer pairs and tool exchanges (templates)."""

    title: str
    system: str
    pairs: tuple[tuple[str, str], ...]
    tools: tuple[ToolTurn, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "trip to Japan",
        "You are a concise travel planner. Prefer trains, quiet places and local food.",
        (
            (
                "We land in Tokyo on {day} at {time}. Is it realistic to reach Hakone the same "
                "evening with {n} suitcases, or should we stay near the airport first?",
                "It is realistic: take the Narita Express to Shinagawa, then the Romancecar to "
                "Hakone-Yumoto, about 3 hours door to door. With {n} suitcases, forward them to "
                "the ryokan by takkyubin for around {m} euros each and travel light.",
            ),
            (
                "My partner is vegetarian and I avoid shellfish. Which dishes should we look for "
                "in Kyoto, and which phrases should we learn for restaurants?",
                "Look for shojin ryori at temple restaurants in Arashiyama, yudofu and vegetable "
                "tempura. Learn 'bejitarian desu' and 'ebi to kani wa taberaremasen'. Dashi "
                "often contains fish, so ask about it before ordering.",
            ),
            (
                "Is a Japan Rail Pass still worth it for Tokyo, Kanazawa, Takayama, Kyoto and "
                "Nara, or are single tickets cheaper? Our transport budget is {price} euros.",
                "Since the price increase, single tickets are cheaper for this route: about 380 "
                "euros per person in total. A regional Hokuriku pass saves another 40 euros, "
                "well within your {price} euro budget.",
            ),
            (
                "Which temples in Kyoto are quiet before {time}, and where can we hike for {n} "
                "hours without crowds?",
                "Daitoku-ji sub-temples, Tofuku-ji and Shimogamo shrine are calm early. The "
                "Kurama to Kibune trail takes about 2 hours, and the Daimonji climb gives a view "
                "of the whole city; start before 8 to have them almost to yourselves.",
            ),
            (
                "Remind me what we decided about the ryokan in Hakone and the total budget.",
                "You chose a ryokan with a private onsen in Gora: two nights at about {price} "
                "euros per night with dinner. The trip budget stays at 4,000 euros for two, "
                "flights excluded, with 900 euros kept for Kyoto accommodation.",
            ),
        ),
        (
            ToolTurn(
                "Can you check trains from Kanazawa to Kyoto on {day} morning?",
                "search_trains",
                {"from": "Kanazawa", "to": "Kyoto", "date": "2025-04-14", "after": "08:00"},
                {
                    "options": [
                        {"train": "Thunderbird 12", "dep": "08:32", "arr": "10:51", "eur": 46},
                        {"train": "Thunderbird 16", "dep": "09:31", "arr": "11:49", "eur": 46},
                    ]
                },
                "The Thunderbird 12 leaves Kanazawa at 08:32 and reaches Kyoto at 10:51 for 46 "
                "euros; the 09:31 is the backup. Sit on the left for the lake view.",
            ),
            ToolTurn(
                "What will the weather be like in Takayama around {day}?",
                "get_weather",
                {"city": "Takayama", "days": 2},
                {
                    "forecast": [
                        {"day": "Mon", "high_c": 14, "low_c": 3, "rain_mm": 0},
                        {"day": "Tue", "high_c": 12, "low_c": 2, "rain_mm": 6},
                    ]
                },
                "Expect 12 to 14 degrees by day and near freezing at night, with rain on "
                "Tuesday. Pack a warm layer and plan the old town walk for Monday.",
            ),
        ),
    ),
    Topic(
        "memory leak",
        "You are a senior backend engineer helping to debug production services.",
        (
            (
                "Our Python API's memory grows by about {m} MB per hour until the pod is killed "
                "after {n} hours. It runs gunicorn with 4 uvicorn workers. Where do I start?",
                "Confirm it is the Python heap: compare RSS with tracemalloc snapshots taken an "
                "hour apart and diff them by traceback. If tracemalloc stays flat while RSS "
                "grows, suspect a C extension; try MALLOC_ARENA_MAX=2 first.",
            ),
            (
                "tracemalloc shows the growth in our request cache, {price} KB per thousand "
                "requests. We use functools.lru_cache on a method. Could that be it?",
                "Yes. lru_cache on a method keys on self, so every request object stays "
                "referenced by the cache and is never freed. Cache a module-level function keyed "
                "on the arguments that matter, or use a bounded TTLCache.",
            ),
            (
                "After the fix, memory is flat but p99 latency went from {m} ms to {price} ms. "
                "What should I measure next?",
                "Profile the hot path with py-spy for a few minutes and compare flame graphs "
                "before and after. A cache miss storm is likely: warm the cache at startup and "
                "add a hit-ratio metric to the dashboard.",
            ),
            (
                "Should we switch to {n} workers with more threads each? The box has 8 vCPUs "
                "and 16 GB of memory.",
                "Keep processes for CPU-bound work because of the GIL: 8 vCPUs take 8 to 9 "
                "workers if each stays under 1.5 GB. Add threads only for I/O-heavy endpoints, "
                "and load test both settings with the same traffic replay.",
            ),
            (
                "Summarize the decisions so far for the incident ticket.",
                "Root cause: lru_cache on a method retained request objects. Fix: module-level "
                "cache keyed on tenant and route, bounded to 10,000 entries. Follow-ups: cache "
                "warm-up, hit-ratio metric, MALLOC_ARENA_MAX=2, load test by {day}.",
            ),
        ),
        (
            ToolTurn(
                "Pull the memory metrics of the api service for the last {n} hours.",
                "get_metrics",
                {"service": "api", "metric": "container_memory_rss", "window": "6h"},
                {"samples_mb": [612, 731, 845, 968, 1093], "limit_mb": 1536},
                "Memory rose from 612 MB to 1,093 MB in four hours, about 120 MB per hour, "
                "against a 1,536 MB limit: the pod would be killed in about 4 more hours.",
            ),
            ToolTurn(
                "Search the logs for OOMKilled events since {day}.",
                "search_logs",
                {"query": "OOMKilled", "since": "7d", "service": "api"},
                {"hits": 7, "last": "2025-03-08T22:41:00Z", "pods": ["api-7f9c", "api-2b1d"]},
                "There were 7 OOMKilled events on two pods this week, the last on March 8 at "
                "22:41 UTC, which matches the growth rate you measured.",
            ),
        ),
    ),
    Topic(
        "dinner party",
        "You are a friendly cooking assistant who plans menus and shopping lists.",
        (
            (
                "I'm hosting {n} friends on {day}; two are vegetarian and one is gluten-free. "
                "Can you suggest a three-course menu I can mostly prepare in advance?",
                "Start with a beetroot and orange salad with walnuts, then a mushroom and "
                "chestnut wellington in gluten-free pastry, with a roast chicken for the meat "
                "eaters. Finish with a chocolate olive-oil cake made with almond flour.",
            ),
            (
                "How much of each main should I make so nobody goes hungry? Budget is {price} "
                "euros.",
                "One wellington for the vegetarians plus half a portion extra, and a 2 kg "
                "chicken for six. Add roast potatoes at 250 g per person and a green salad; "
                "that stays around {price} euros if you buy the mushrooms at the market.",
            ),
            (
                "Can I make the wellington the day before, and how do I keep the pastry from "
                "going soggy?",
                "Assemble it a day ahead but bake it on the day. Cook the filling until quite "
                "dry, let it cool, brush the pastry with egg twice, and bake on a preheated tray "
                "at 200 degrees for {m} minutes so the base crisps.",
            ),
            (
                "Which wine goes with the mushrooms and the chicken, under {m} euros a bottle?",
                "A Pinot Noir from Burgundy or the Loire suits both; a Beaujolais cru such as "
                "Morgon is great value. For white, an oaked Chardonnay works. Plan one bottle "
                "for every two guests.",
            ),
            (
                "Give me a timeline for {day} afternoon so dinner is served at {time}.",
                "Three hours before: potatoes parboiled and in the oven. Ninety minutes before: "
                "chicken in. One hour before: wellington in; dress the salad at the last "
                "minute. Rest the chicken 20 minutes while the wellington finishes.",
            ),
        ),
        (
            ToolTurn(
                "Find a gluten-free dessert that takes under {m} minutes.",
                "find_recipes",
                {"diet": "gluten-free", "course": "dessert", "max_minutes": 45},
                {
                    "results": [
                        {"title": "Flourless chocolate cake", "minutes": 40, "rating": 4.8},
                        {"title": "Pear and almond crumble", "minutes": 35, "rating": 4.6},
                    ]
                },
                "The flourless chocolate cake takes 40 minutes and is rated 4.8; the pear and "
                "almond crumble takes 35. Both can be baked the day before.",
            ),
            ToolTurn(
                "What does my shopping list cost at market prices?",
                "price_list",
                {"items": ["mushrooms 1kg", "chestnuts 400g", "chicken 2kg", "pinot noir x4"]},
                {"total_eur": 96.4, "most_expensive": "pinot noir x4", "eur": 52},
                "The list comes to 96.40 euros, more than half of it the four bottles of Pinot "
                "Noir at 52 euros.",
            ),
        ),
    ),
    Topic(
        "saving for a flat",
        "You are a careful personal-finance assistant. You are not a licensed advisor.",
        (
            (
                "I take home {price}0 euros a month and want to buy a flat in {n} years. How "
                "much should I save for a 20 percent deposit on a 300,000 euro flat?",
                "The deposit is 60,000 euros plus about 8 percent for fees and taxes, 84,000 "
                "euros in all. Over five years that is 1,400 euros a month, less if part of it "
                "earns interest.",
            ),
            (
                "Should the savings sit in a high-yield account or an index fund if I need "
                "them in {n} years?",
                "For money needed within three to five years, keep most of it in a high-yield "
                "account or short-term bonds; a 30 percent fall the year before you buy would "
                "hurt. Beyond five years, an index fund for part of it is reasonable.",
            ),
            (
                "My rent is {price} euros and food about {m}0 euros. Where can I cut without "
                "being miserable?",
                "Cut subscriptions and insurance first: easy to do once. Cook in batches twice "
                "a week and cap eating out at a fixed weekly amount. Together with a cheaper "
                "phone plan that often saves 150 euros a month.",
            ),
            (
                "What interest rate should I assume when comparing mortgage offers?",
                "Use current offers around 3.5 percent for a 25-year fixed rate and test your "
                "budget at 5 percent too. Keep the payment under a third of net income, and "
                "compare effective rates including fees.",
            ),
            (
                "Remind me what we agreed for my savings plan.",
                "Target: 84,000 euros for deposit and fees within five years, about 1,400 euros "
                "a month. Emergency fund of three months' expenses first, savings in a "
                "high-yield account, and a review on the first {day} of each month.",
            ),
        ),
        (
            ToolTurn(
                "Compute the monthly payment of a 240,000 euro mortgage over 25 years.",
                "mortgage_payment",
                {"principal": 240000, "annual_rate": 0.035, "years": 25},
                {"monthly_eur": 1201.5, "total_interest_eur": 120450},
                "At 3.5 percent over 25 years the payment is 1,201.50 euros a month, with "
                "120,450 euros of interest in total.",
            ),
            ToolTurn(
                "What do the best instant-access savings accounts pay on {day}?",
                "savings_rates",
                {"country": "DE", "type": "instant_access"},
                {"best": [{"bank": "Bank A", "rate": 0.031}, {"bank": "Bank B", "rate": 0.029}]},
                "The best instant-access accounts pay 3.1 and 2.9 percent right now; at 1,400 "
                "euros a month that is about 1,300 euros of interest in year three.",
            ),
        ),
    ),
    Topic(
        "marathon training",
        "You are a running coach who writes practical training plans.",
        (
            (
                "I ran a half marathon in 1:{m} and want to run a marathon in {n} months. How "
                "many days a week should I train?",
                "Four to five: one long run, one tempo or interval session, and two or three "
                "easy runs. Raise weekly distance by no more than 10 percent, with a lighter "
                "week every fourth week.",
            ),
            (
                "How long should my longest run be before the race, and when?",
                "Peak at 32 to 35 kilometres about three weeks before race day, at an easy "
                "pace. Longer runs add fatigue without much benefit for a first marathon.",
            ),
            (
                "My left knee hurts after runs longer than {m} kilometres. Should I stop?",
                "Pain that changes your stride is a reason to rest two or three days. Check "
                "your shoes' mileage, add hip and glute strength work twice a week, and see a "
                "physiotherapist if it lasts beyond a week.",
            ),
            (
                "What should I eat during the race? I tried gels once and felt sick.",
                "Practise fuelling on long runs: try gels, chews or dates, aiming for 40 to 60 "
                "grams of carbohydrate per hour from minute 45. Drink a little water with each "
                "gel; that often fixes the nausea.",
            ),
            (
                "Summarize my plan for the next {n} weeks.",
                "Five days a week: long run on {day} growing from 16 to 35 kilometres, "
                "intervals on Tuesday, tempo on Thursday, easy runs otherwise, strength work "
                "twice a week for the knee, and a three-week taper.",
            ),
        ),
        (
            ToolTurn(
                "Check the weather in Berlin for my long run on {day}.",
                "get_weather",
                {"city": "Berlin", "days": 2},
                {
                    "forecast": [
                        {"day": "Sat", "high_c": 9, "low_c": 1, "wind_kmh": 25},
                        {"day": "Sun", "high_c": 11, "low_c": 4, "wind_kmh": 8},
                    ]
                },
                "Sunday looks better: 4 to 11 degrees with light wind, against 25 km/h wind on "
                "Saturday. Start early and wear a layer you can tie around your waist.",
            ),
            ToolTurn(
                "Log today's run: {m} kilometres at 5:40 per kilometre.",
                "log_run",
                {"distance_km": 18, "pace": "5:40", "feel": "good"},
                {"week_km": 46, "plan_km": 48, "streak_days": 12},
                "Logged. You are at 46 of the planned 48 kilometres this week and on a 12-day "
                "streak; keep tomorrow's run easy.",
            ),
        ),
    ),
    Topic(
        "order support",
        "You are a polite customer-support agent for an online electronics shop.",
        (
            (
                "My tablet arrived with a cracked screen. I ordered it on {day}, order number "
                "A-{m}{n}4. What can you do?",
                "I'm sorry about that. Please send two photos of the damage and of the box; we "
                "ship a replacement as soon as they arrive, and a prepaid label lets you return "
                "the damaged tablet within 14 days.",
            ),
            (
                "Can I get a refund instead? I found it {price} euros cheaper elsewhere.",
                "Yes, you can choose a full refund; it reaches your original payment method 5 "
                "to 7 working days after we receive the tablet. We also match prices within 30 "
                "days if you prefer to keep a replacement.",
            ),
            (
                "The return label you sent does not work at the post office.",
                "I have issued a new label with a fresh barcode and emailed it; labels expire "
                "after 14 days, which is probably what happened. You can also drop the parcel "
                "at a partner kiosk with the QR code, no printing needed.",
            ),
            (
                "How long until the replacement arrives if I send the photos today at {time}?",
                "Photos received before 16:00 are approved the same day; replacements ship the "
                "next working day by express, so you should have it within 2 to 3 working "
                "days.",
            ),
            (
                "Please confirm everything we agreed in one message.",
                "Confirmed: a replacement tablet by express once the photos arrive, a new "
                "return label by email, the damaged tablet back within 14 days at no cost, and "
                "a price-match credit of {price} euros once the lower price is verified.",
            ),
        ),
        (
            ToolTurn(
                "Look up the status of order A-{m}{n}4.",
                "lookup_order",
                {"order_id": "A-58214"},
                {
                    "status": "delivered",
                    "delivered_at": "2025-03-07T11:20:00Z",
                    "items": [{"sku": "TAB-10-128", "name": "Tablet 10in 128GB", "eur": 329}],
                },
                "Order A-58214 was delivered on March 7 at 11:20: one 10-inch 128 GB tablet "
                "at 329 euros.",
            ),
            ToolTurn(
                "Create the replacement shipment.",
                "create_replacement",
                {"order_id": "A-58214", "sku": "TAB-10-128", "shipping": "express"},
                {"replacement_id": "R-9931", "eta_days": 2, "label_sent": True},
                "Replacement R-9931 is booked with express shipping, expected in 2 days, and "
                "the return label is in your inbox.",
            ),
        ),
    ),
)

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        n=rng.randint(2, 9),
        m=rng.randint(12, 89),
        price=rng.randrange(40, 900, 5),
        day=rng.choice(_DAYS),
        time=f"{rng.randint(7, 20):02d}:{rng.choice(('00', '15', '30', '45'))}",
    )


def build_conversation(index: int, turns: int) -> tuple[Topic, list[list[dict[str, Any]]]]:
    """Session ``index``'s topic and its ``turns`` exchanges (deterministic).

    An exchange is ``[user, assistant]``, or, every third one,
    ``[user, assistant with tool_calls, tool result, assistant]``.
    """
    topic = TOPICS[index % len(TOPICS)]
    rng = random.Random(7919 * (index + 1))
    offset = rng.randrange(len(topic.pairs))
    exchanges: list[list[dict[str, Any]]] = []
    for k in range(turns):
        if k % 3 == 2 and topic.tools:
            tool = topic.tools[(k // 3) % len(topic.tools)]
            call_id = f"call_{index + 1}_{k + 1}"
            exchanges.append(
                [
                    {"role": "user", "content": _fill(tool.question, rng)},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call_id,
                                "type": "function",
                                "function": {
                                    "name": tool.name,
                                    "arguments": json.dumps(tool.arguments),
                                },
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": call_id, "content": json.dumps(tool.result)},
                    {"role": "assistant", "content": _fill(tool.answer, rng)},
                ]
            )
        else:
            question, answer = topic.pairs[(k + offset) % len(topic.pairs)]
            exchanges.append(
                [
                    {"role": "user", "content": _fill(question, rng)},
                    {"role": "assistant", "content": _fill(answer, rng)},
                ]
            )
    return topic, exchanges


# -- writer processes --------------------------------------------------------------------------


@dataclass(frozen=True)
class WriterSpec:
    """What one writer process does (pickled to the spawned process)."""

    index: int
    redis_url: str
    prefix: str
    shards: int
    token_limit: int
    encoding: str
    sessions: tuple[tuple[int, str], ...]  # (session index, session id)
    turns: int
    duration: float
    started_at: float  # time.time() when the demo started
    seed: int


class WriterEvent(NamedTuple):
    """What a writer reports: ``ready``, ``ack`` (one acknowledged append), ``error``, ``done``."""

    kind: str
    writer: int
    session: str = ""
    message_id: str = ""
    role: str = ""
    tokens: int = 0
    flagged: bool = False
    total: int = 0
    text: str = ""


class _Step(NamedTuple):
    delay: float  # seconds after the session's previous step
    message: dict[str, Any]


#: Share of an exchange's time before each of its messages (typing, thinking, tool latency).
_PLAIN_SHARES = (0.55, 0.45)
_TOOL_SHARES = (0.45, 0.2, 0.1, 0.25)


def _steps(
    exchanges: Sequence[Sequence[dict[str, Any]]], pace: float, rng: random.Random
) -> list[_Step]:
    steps: list[_Step] = []
    for exchange in exchanges:
        shares = _TOOL_SHARES if len(exchange) == len(_TOOL_SHARES) else _PLAIN_SHARES
        for share, message in zip(shares, exchange, strict=True):
            steps.append(_Step(pace * share * rng.uniform(0.6, 1.4), message))
    return steps


def writer_main(spec: WriterSpec, events: Queue[WriterEvent], go: Event, stop: Event) -> None:
    """A writer process: append its sessions' exchanges, interleaved, and report each ack."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which sets `stop`
    sent = 0
    failed = False
    store: ConversationStore | None = None
    try:
        store = ConversationStore.from_url(
            spec.redis_url,
            token_limit=spec.token_limit,
            encoding=spec.encoding,
            prefix=spec.prefix,
            shards=spec.shards,
            socket_timeout=10,
        )
        store.counter.count_message({"role": "user", "content": "load the encoding now"})
        rng = random.Random(spec.seed)
        events.put(WriterEvent("ready", spec.index))
        while not go.wait(0.2):
            if stop.is_set():
                return
        # Pace: finish within WRITE_SHARE of the duration, whatever the start-up took.
        window = spec.duration * WRITE_SHARE - (time.time() - spec.started_at)
        pace = max(0.3, window) / spec.turns
        stop_at = spec.started_at + spec.duration * WRITE_STOP_SHARE
        plans = [
            (sid, _steps(build_conversation(index, spec.turns)[1], pace, rng))
            for index, sid in spec.sessions
        ]
        start = time.monotonic()
        heap = [
            (start + steps[0].delay + rng.uniform(0, pace), slot, 0)
            for slot, (_, steps) in enumerate(plans)
        ]
        heapq.heapify(heap)
        while heap:
            due, slot, step = heapq.heappop(heap)
            wait = due - time.monotonic()
            if (wait > 0 and stop.wait(wait)) or stop.is_set() or time.time() >= stop_at:
                break
            sid, steps = plans[slot]
            message = steps[step].message
            result = store.append(sid, message)
            tokens = store.counter.count_message(message)
            events.put(
                WriterEvent(
                    "ack",
                    spec.index,
                    sid,
                    result.message_ids[0],
                    str(message["role"]),
                    tokens,
                    result.flagged,
                )
            )
            sent += 1
            if step + 1 < len(steps):
                next_due = max(due, time.monotonic()) + steps[step + 1].delay
                heapq.heappush(heap, (next_due, slot, step + 1))
    except Exception as exc:
        failed = True
        events.put(WriterEvent("error", spec.index, text=f"{type(exc).__name__}: {exc}"))
    finally:
        events.put(WriterEvent("done", spec.index, total=sent))
        if store is not None:
            store.close()
    if failed:
        sys.exit(1)


# -- what the view shows -----------------------------------------------------------------------


@dataclass
class SessionRow:
    """One session as the live view shows it (meta polled from Redis, acks from writers)."""

    session_id: str
    topic: str
    writer: int
    token_limit: int
    system_ids: tuple[str, ...] = ()
    system_tokens: int = 0
    tokens: int = 0
    messages: int = 0
    state: str = "idle"
    epoch: int = 0
    acked: int = 0
    flagged: int = 0


@dataclass(frozen=True)
class LogEntry:
    at: float  # seconds since the demo started
    text: str
    style: str = ""


@dataclass
class DemoView:
    """Everything the live view and the progress lines show."""

    options: DemoOptions
    engine: str
    prefix: str
    summarizer: str
    started: float = field(default_factory=time.monotonic)
    sessions: dict[str, SessionRow] = field(default_factory=dict)
    phase: str = "starting"
    queued: int = 0
    running: int = 0
    dead: int = 0
    messages: int = 0
    tokens_appended: int = 0
    compactions: int = 0
    failures: int = 0
    log: list[LogEntry] = field(default_factory=list)
    ended: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def tokens_stored(self) -> int:
        return sum(row.tokens for row in self.sessions.values())

    @property
    def tokens_saved(self) -> int:
        system = sum(row.system_tokens for row in self.sessions.values())
        return max(0, self.tokens_appended + system - self.tokens_stored)

    def add_log(self, text: str, style: str = "") -> None:
        if len(self.log) < LOG_LIMIT:
            self.log.append(LogEntry(self.elapsed, text, style))


# -- the verification --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One verification: its name, whether it passed, and the numbers behind it."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class DemoResult:
    """The checks and the totals they were computed from."""

    checks: tuple[Check, ...]
    totals: dict[str, Any]
    sessions: tuple[dict[str, Any], ...]
    info: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            **self.totals,
            "checks": [
                {"name": c.name, "passed": c.passed, "detail": c.detail} for c in self.checks
            ],
            "sessions": list(self.sessions),
            **self.info,
        }


class Ack(NamedTuple):
    session: str
    message_id: str
    role: str
    tokens: int


@dataclass(frozen=True)
class _Stored:
    """One session as Redis holds it at the end."""

    meta: dict[str, str]
    records: list[dict[str, Any]]
    archive: list[dict[str, Any]]

    def num(self, name: str) -> int:
        return int(self.meta.get(name, 0) or 0)


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class _Facts:
    """What the checks compare: the writers' reports, the daemon's outcomes, Redis' contents."""

    rows: dict[str, SessionRow]
    acks: list[Ack]
    writer_counts: dict[int, int]
    writer_exits: dict[int, int | None]
    writer_errors: list[str]
    outcomes: list[Outcome]
    stored: dict[str, _Stored]
    stats: Stats


def _check_appended(f: _Facts) -> Check:
    received = len(f.acks)
    reported = sum(f.writer_counts.values())
    server = sum(st.num("appended") - len(f.rows[sid].system_ids) for sid, st in f.stored.items())
    problems: list[str] = []
    for writer, code in sorted(f.writer_exits.items()):
        if code != 0:
            problems.append(f"writer {writer} exited {code}")
        if writer not in f.writer_counts:
            problems.append(f"writer {writer} never reported its total")
    problems += [f"writer error: {e}" for e in f.writer_errors[:3]]
    if received != reported:
        problems.append(f"{received:,} acks received but the writers reported {reported:,}")
    if server != received:
        problems.append(f"the server counted {server:,} appends, the writers {received:,}")
    if received == 0:
        problems.append("nothing was appended")
    if problems:
        return Check("messages appended", False, "; ".join(problems))
    return Check(
        "messages appended",
        True,
        f"{_plural(received, 'append')} acknowledged by "
        f"{_plural(len(f.writer_exits), 'writer process', 'writer processes')} (all exited 0); "
        f"the server counted {server:,}",
    )


def _check_compactions(f: _Facts) -> Check:
    by_status = Counter(o.status for o in f.outcomes)
    compacted = by_status["compacted"]
    epochs = sum(st.num("epoch") for st in f.stored.values())
    problems: list[str] = []
    if compacted != epochs:
        problems.append(f"the daemon reported {compacted} but the epochs add up to {epochs}")
    for sid, st in f.stored.items():
        summaries = sum(1 for r in st.records if r.get("kind") == "summary")
        if summaries != (1 if st.num("epoch") else 0):
            problems.append(f"{sid} holds {summaries} summaries at epoch {st.num('epoch')}")
    flagged = any(row.flagged for row in f.rows.values())
    if flagged and compacted == 0:
        problems.append("sessions passed their limit but none was compacted")
    others = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()) if s != "compacted")
    if problems:
        return Check("compactions", False, "; ".join(problems))
    detail = (
        f"{_plural(compacted, 'compaction')}, matching the sessions' epochs ({epochs})"
        if compacted
        else "no session passed its limit: nothing to compact"
    )
    return Check("compactions", True, detail + (f"; other outcomes: {others}" if others else ""))


def _check_tokens_saved(f: _Facts, compacted: int) -> Check:
    system = sum(row.system_tokens for row in f.rows.values())
    appended = sum(a.tokens for a in f.acks) + system
    stored = sum(st.num("token_count") for st in f.stored.values())
    saved = appended - stored
    archived = sum(int(r.get("tokens", 0)) for st in f.stored.values() for r in st.archive)
    summaries = sum(
        int(r.get("tokens", 0))
        for st in f.stored.values()
        for r in st.records
        if r.get("kind") == "summary"
    )
    share = f" ({saved / appended:.0%})" if appended else ""
    detail = (
        f"{saved:,} of {appended:,} tokens{share} saved: {archived:,} archived tokens replaced "
        f"by {summaries:,} summary tokens; {stored:,} tokens held now"
    )
    if saved != archived - summaries:
        return Check(
            "tokens saved", False, f"{detail}; expected appended - held = archived - summaries"
        )
    if compacted and saved <= 0:
        return Check("tokens saved", False, f"{detail}; compactions did not shrink anything")
    return Check("tokens saved", True, detail)


def _check_nothing_lost(f: _Facts) -> Check:
    expected: dict[tuple[str, str], tuple[str, int]] = {
        (a.session, a.message_id): (a.role, a.tokens) for a in f.acks
    }
    for sid, row in f.rows.items():
        for mid in row.system_ids:
            expected[(sid, mid)] = ("system", -1)  # tokens checked by the totals check
    found: Counter[tuple[str, str]] = Counter()
    records: dict[tuple[str, str], dict[str, Any]] = {}
    in_lists = in_archives = 0
    misplaced: list[str] = []
    for sid, st in f.stored.items():
        for rec in st.records:
            if rec.get("kind") != "summary":
                found[(sid, str(rec.get("id")))] += 1
                records[(sid, str(rec.get("id")))] = rec
                in_lists += 1
        for rec in st.archive:
            if rec.get("kind") == "summary" or rec.get("role") == "system":
                misplaced.append(f"{sid}/{rec.get('id')} ({rec.get('kind')}) in the archive")
            found[(sid, str(rec.get("id")))] += 1
            records[(sid, str(rec.get("id")))] = rec
            in_archives += 1
    missing = [f"{s}/{m}" for (s, m) in expected if found[(s, m)] == 0]
    twice = [f"{s}/{m} x{n}" for (s, m), n in found.items() if n > 1]
    unknown = [f"{s}/{m}" for (s, m) in found if (s, m) not in expected]
    changed = [
        f"{s}/{m}"
        for (s, m), (role, tokens) in expected.items()
        if (s, m) in records
        and (
            records[(s, m)].get("role") != role
            or (tokens >= 0 and int(records[(s, m)].get("tokens", -1)) != tokens)
        )
    ]
    problems = [
        f"{label}: {len(items)} ({_examples(items)})"
        for label, items in (
            ("missing", missing),
            ("stored more than once", twice),
            ("never acknowledged", unknown),
            ("role or tokens changed", changed),
            ("misplaced", misplaced),
        )
        if items
    ]
    if problems:
        return Check("nothing lost", False, "; ".join(problems))
    return Check(
        "nothing lost",
        True,
        f"all {len(f.acks):,} acknowledged messages (and the system prompts) found exactly "
        f"once: {in_lists:,} in session lists, {in_archives:,} in archives",
    )


def _check_token_totals(f: _Facts) -> Check:
    wrong: list[str] = []
    for sid, st in f.stored.items():
        summed = sum(int(r.get("tokens", 0)) for r in st.records)
        if st.num("token_count") != summed:
            wrong.append(f"{sid}: token_count {st.num('token_count'):,} != {summed:,} summed")
        if st.num("message_count") != len(st.records):
            wrong.append(f"{sid}: message_count {st.num('message_count')} != {len(st.records)}")
    if wrong:
        return Check("token totals", False, "; ".join(wrong))
    return Check(
        "token totals",
        True,
        f"{len(f.stored)}/{len(f.stored)} sessions: token_count equals the sum of the stored "
        f"records' tokens, message_count their number",
    )


def _check_settled(f: _Facts) -> Check:
    s = f.stats
    over = [
        f"{sid} {st.num('token_count'):,}/{st.num('token_limit'):,}"
        for sid, st in f.stored.items()
        if st.num("token_count") > st.num("token_limit")
    ]
    problems = [f"{n} {what}" for n, what in ((s.queued, "queued"), (s.running, "running")) if n]
    problems += [f"{s.dead} dead-lettered"] if s.dead else []
    problems += [f"over the limit: {_examples(over)}"] if over else []
    if problems:
        return Check("settled", False, "; ".join(problems) + " when the demo ended")
    largest = max(
        (st.num("token_count") / max(1, st.num("token_limit")) for st in f.stored.values()),
        default=0.0,
    )
    return Check(
        "settled",
        True,
        f"queue empty, nothing running, every session within its limit (fullest at {largest:.0%})",
    )


def verify(f: _Facts) -> tuple[Check, ...]:
    """Every check, computed from the facts gathered at the end of the run."""
    compacted = sum(1 for o in f.outcomes if o.status == "compacted")
    return (
        _check_appended(f),
        _check_compactions(f),
        _check_tokens_saved(f, compacted),
        _check_nothing_lost(f),
        _check_token_totals(f),
        _check_settled(f),
    )


# -- reporters ---------------------------------------------------------------------------------


class Reporter(Protocol):
    """Shows the run: :meth:`start`, :meth:`update` (often), :meth:`stop`, :meth:`summary`."""

    def start(self, view: DemoView) -> None: ...

    def update(self, view: DemoView) -> None: ...

    def stop(self, view: DemoView) -> None: ...

    def summary(self, result: DemoResult) -> None: ...


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _headline(view: DemoView) -> str:
    o = view.options
    return (
        f"{_plural(len(view.sessions), 'session')}, "
        f"{_plural(o.writer_count, 'writer process', 'writer processes')}, "
        f"{_plural(o.turns, 'exchange')} each, token limit {o.token_limit:,}, "
        f"{view.summarizer} summarizer, {view.engine}, keys {view.prefix}:*"
    )


def _status(view: DemoView) -> str:
    return (
        f"{view.phase}: {_plural(view.messages, 'message')} appended, "
        f"{_plural(view.compactions, 'compaction')}, {view.tokens_saved:,} tokens saved, "
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
        f"{_plural(len(view.sessions), 'session')} · ",
        f"{_plural(o.writer_count, 'writer process', 'writer processes')} · ",
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


# -- the run -----------------------------------------------------------------------------------


class _ObservedMetrics(Metrics):
    """The daemon's metrics, also handing every compaction outcome to the demo."""

    def __init__(self, on_outcome: Callable[[Outcome], None]) -> None:
        super().__init__()
        self._on_outcome = on_outcome

    def record(self, outcome: Outcome) -> None:
        super().record(outcome)
        self._on_outcome(outcome)


class _LogToView(logging.Handler):
    """convstate's warnings go to the view's log instead of scribbling over the live view."""

    def __init__(self, view: DemoView) -> None:
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        style = "bold red" if record.levelno >= logging.ERROR else "yellow"
        self.view.add_log(f"{record.name}: {record.getMessage()}", style)


@contextlib.contextmanager
def _logs_into(view: DemoView) -> Iterator[None]:
    logger = logging.getLogger("convstate")
    handler = _LogToView(view)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@contextlib.contextmanager
def _engine(redis_url: str | None) -> Iterator[tuple[str, str]]:
    """``(url, description)`` of the server to use: the given one, or a private one that is
    stopped (and its directory removed) afterwards."""
    if redis_url:
        yield redis_url, f"server at {redact_url(redis_url)}"
        return
    from convstate.embedded import RedisServer

    server = RedisServer("redis")
    server.start()
    try:
        version = ".".join(map(str, server.version))
        print(
            f"started a private {server.server_kind} {version} at {server.url} in {server.dir}",
            file=sys.stderr,
            flush=True,
        )
        yield server.url, f"private {server.server_kind} {version} at {server.host}:{server.port}"
    finally:
        server.stop()


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix:`` (SCAN + UNLINK); returns how many."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


class _DemoRun:
    """One run of the demo; :meth:`run` does everything and returns the checked result."""

    def __init__(self, options: DemoOptions, reporter: Reporter) -> None:
        self.options = options
        self.reporter = reporter
        self.encoding = options.resolved_encoding()
        self.prefix = f"csdemo-{secrets.token_hex(4)}"
        self.schema = KeySchema(self.prefix, DEMO_SHARDS)
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.acks: list[Ack] = []
        self.outcomes: list[Outcome] = []
        self.ready: set[int] = set()
        self.writer_counts: dict[int, int] = {}
        self.writer_errors: list[str] = []
        self.writers_done_at: float | None = None
        self.last_poll = 0.0
        self.processes: list[SpawnProcess] = []
        ctx = multiprocessing.get_context("spawn")
        self.ctx = ctx
        self.events: Queue[WriterEvent] = ctx.Queue()
        self.go = ctx.Event()
        self.stop = ctx.Event()
        self.view: DemoView | None = None
        self.client: redis.Redis | None = None
        self.admin: Admin | None = None

    def _deadline(self, share: float) -> float:
        return self.started + self.options.duration * share

    # -- setup ---------------------------------------------------------------------------------

    def _create_sessions(self, client: redis.Redis, engine: str, summarizer: str) -> DemoView:
        o = self.options
        view = DemoView(o, engine, self.prefix, summarizer, started=self.started)
        store = ConversationStore(
            client,
            token_limit=o.token_limit,
            encoding=self.encoding,
            prefix=self.prefix,
            shards=DEMO_SHARDS,
        )
        for i in range(o.sessions):
            sid = f"chat-{i + 1}"
            topic = TOPICS[i % len(TOPICS)]
            state = store.create_session(sid, system=topic.system)
            view.sessions[sid] = SessionRow(
                sid,
                topic.title,
                writer=i % o.writer_count,
                token_limit=o.token_limit,
                system_ids=tuple(str(m["id"]) for m in state.messages),
                system_tokens=state.meta.token_count,
                tokens=state.meta.token_count,
                messages=state.meta.message_count,
            )
        return view

    def _start_writers(self, url: str, view: DemoView) -> None:
        o = self.options
        for w in range(o.writer_count):
            spec = WriterSpec(
                index=w,
                redis_url=url,
                prefix=self.prefix,
                shards=DEMO_SHARDS,
                token_limit=o.token_limit,
                encoding=self.encoding,
                sessions=tuple(
                    (i, row.session_id)
                    for i, row in enumerate(view.sessions.values())
                    if row.writer == w
                ),
                turns=o.turns,
                duration=o.duration,
                started_at=self.started_wall,
                seed=w + 1,
            )
            process = self.ctx.Process(
                target=writer_main,
                args=(spec, self.events, self.go, self.stop),
                name=f"convstate-demo-writer-{w}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)

    def _stop_writers(self) -> None:
        """Stop the writers (they finish the append in flight), reading their last events."""
        self.stop.set()
        self.go.set()
        deadline = time.monotonic() + 10
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            self._pump()
            time.sleep(TICK)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join(5)
        self._pump()

    # -- events from the writers and the daemon --------------------------------------------------

    def _pump(self) -> None:
        """Handle what the writers have reported so far."""
        view = self.view
        assert view is not None
        for _ in range(10_000):
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event.kind == "ack":
                self.acks.append(Ack(event.session, event.message_id, event.role, event.tokens))
                row = view.sessions[event.session]
                row.acked += 1
                row.flagged += int(event.flagged)
                view.messages += 1
                view.tokens_appended += event.tokens
            elif event.kind == "ready":
                self.ready.add(event.writer)
            elif event.kind == "error":
                self.writer_errors.append(event.text)
                view.add_log(f"writer {event.writer} failed: {event.text}", "bold red")
            elif event.kind == "done":
                self.writer_counts[event.writer] = event.total

    def _on_outcome(self, outcome: Outcome) -> None:
        view = self.view
        assert view is not None
        self.outcomes.append(outcome)
        sid = outcome.session_id
        if outcome.status == "compacted":
            view.compactions += 1
            view.add_log(
                f"{sid} compacted {outcome.tokens_before:,} -> {outcome.tokens_after:,} tokens "
                f"({outcome.folded} messages folded)",
                "green",
            )
        elif outcome.status == "uncompactable":
            view.add_log(f"{sid} left as is: {outcome.note}", "dim")
        else:
            view.failures += 1
            style = "bold red" if outcome.status in ("dead", "error") else "yellow"
            view.add_log(f"{sid} {outcome.status}: {outcome.note}", style)

    def _snapshot(self) -> tuple[list[list[Any]], Stats]:
        assert self.client is not None
        assert self.admin is not None
        assert self.view is not None
        pipe = self.client.pipeline(transaction=False)
        for sid in self.view.sessions:
            pipe.hmget(
                self.schema.session(sid).meta,
                ["token_count", "message_count", "state", "epoch"],
            )
        return pipe.execute(), self.admin.stats()

    async def _poll(self) -> None:
        view = self.view
        assert view is not None
        metas, stats = await asyncio.to_thread(self._snapshot)
        for row, (tokens, count, state, epoch) in zip(view.sessions.values(), metas, strict=True):
            row.tokens = int(tokens or 0)
            row.messages = int(count or 0)
            row.state = _text(state) if state is not None else "?"
            row.epoch = int(epoch or 0)
        view.queued, view.running, view.dead = stats.queued, stats.running, stats.dead
        self.last_poll = time.monotonic()

    # -- the asyncio part: the daemon, the view ----------------------------------------------------

    def _writers_finished(self) -> bool:
        finished = all(
            w in self.writer_counts or not p.is_alive() for w, p in enumerate(self.processes)
        )
        if finished and self.writers_done_at is None:
            self.writers_done_at = time.monotonic()
        return finished

    def _settled(self) -> bool:
        """The writers are done and a poll since shows nothing queued or running."""
        view = self.view
        assert view is not None
        if not self._writers_finished():
            return False
        view.phase = "compacting the rest"
        assert self.writers_done_at is not None
        return (
            self.last_poll > self.writers_done_at
            and view.queued == 0
            and view.running == 0
            and all(row.state != "running" for row in view.sessions.values())
        )

    async def _run_until(
        self, serve: asyncio.Task[None], done: Callable[[], bool], deadline: float
    ) -> bool:
        next_poll = 0.0
        while True:
            self._pump()
            now = time.monotonic()
            if now >= next_poll:
                await self._poll()
                next_poll = now + POLL_INTERVAL
                assert self.view is not None
                self.reporter.update(self.view)
            if serve.done():
                serve.result()  # raises what stopped it
                raise DemoError("the compaction daemon stopped unexpectedly")
            if done():
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(TICK)

    async def _supervise(self, settings: DaemonSettings, summarizer: Summarizer) -> None:
        view = self.view
        assert view is not None
        daemon = Daemon(settings, summarizer=summarizer, metrics=_ObservedMetrics(self._on_outcome))
        serve = asyncio.create_task(daemon.serve(install_signal_handlers=False), name="daemon")
        try:
            started = asyncio.ensure_future(daemon.started.wait())
            await asyncio.wait({started, serve}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if serve.done():
                serve.result()
            if not daemon.started.is_set():
                raise DemoError("the compaction daemon did not start within 10 s")
            view.phase = "starting writers"
            everyone = set(range(len(self.processes)))
            if not await self._run_until(
                serve, lambda: self.ready == everyone or self._writers_finished(), self._deadline(1)
            ):
                view.add_log("the writers did not start in time", "bold red")
                return
            self.go.set()
            view.phase = "writing"
            if not await self._run_until(serve, self._settled, self._deadline(SETTLE_SHARE)):
                view.add_log("--duration reached: stopping", "yellow")
        finally:
            view.phase = "stopping"
            self.stop.set()
            if not serve.done():
                daemon.request_stop()
                await asyncio.wait({serve}, timeout=DAEMON_GRACE + 5)
            if not serve.done():
                daemon.request_stop()  # the second request stops at once
                await asyncio.wait({serve}, timeout=10)
            if serve.done() and not serve.cancelled() and serve.exception() is not None:
                log.error("the compaction daemon failed: %r", serve.exception())

    # -- the checks ------------------------------------------------------------------------------

    def _gather(self) -> _Facts:
        view, client, admin = self.view, self.client, self.admin
        assert view is not None
        assert client is not None
        assert admin is not None
        pipe = client.pipeline(transaction=False)
        for sid in view.sessions:
            keys = self.schema.session(sid)
            pipe.hgetall(keys.meta)
            pipe.lrange(keys.msgs, 0, -1)
            pipe.lrange(keys.archive, 0, -1)
        replies = pipe.execute()
        stored: dict[str, _Stored] = {}
        for i, sid in enumerate(view.sessions):
            meta, msgs, archive = replies[3 * i : 3 * i + 3]
            stored[sid] = _Stored(
                {_text(k): _text(v) for k, v in meta.items()},
                [json.loads(raw) for raw in msgs],
                [json.loads(raw) for raw in archive],
            )
        exits = {i: p.exitcode for i, p in enumerate(self.processes)}
        return _Facts(
            rows=view.sessions,
            acks=self.acks,
            writer_counts=self.writer_counts,
            writer_exits=exits,
            writer_errors=self.writer_errors,
            outcomes=self.outcomes,
            stored=stored,
            stats=admin.stats(),
        )

    def _result(self, facts: _Facts, checks: tuple[Check, ...]) -> DemoResult:
        view = self.view
        assert view is not None
        system = sum(row.system_tokens for row in view.sessions.values())
        appended = sum(a.tokens for a in facts.acks) + system
        held = sum(st.num("token_count") for st in facts.stored.values())
        lost = next((c for c in checks if c.name == "nothing lost"), None)
        totals = {
            "messages_appended": len(facts.acks),
            "compactions": sum(1 for o in facts.outcomes if o.status == "compacted"),
            "tokens_appended": appended,
            "tokens_held": held,
            "tokens_saved": appended - held,
            "archived_messages": sum(len(st.archive) for st in facts.stored.values()),
            "nothing_lost": bool(lost and lost.passed),
            "elapsed_s": round(view.elapsed, 2),
        }
        sessions = tuple(
            {
                "session": sid,
                "topic": view.sessions[sid].topic,
                "writer": view.sessions[sid].writer,
                "acknowledged": view.sessions[sid].acked,
                "token_count": st.num("token_count"),
                "token_limit": st.num("token_limit"),
                "message_count": st.num("message_count"),
                "archived": len(st.archive),
                "epoch": st.num("epoch"),
                "state": st.meta.get("state", "?"),
            }
            for sid, st in facts.stored.items()
        )
        o = self.options
        info = {
            "engine": view.engine,
            "prefix": self.prefix,
            "options": {
                "sessions": o.sessions,
                "writers": o.writer_count,
                "turns": o.turns,
                "duration": o.duration,
                "token_limit": o.token_limit,
                "encoding": self.encoding,
                "summarizer": view.summarizer,
            },
        }
        return DemoResult(checks, totals, sessions, info)

    # -- everything --------------------------------------------------------------------------------

    def run(self) -> DemoResult:
        o = self.options
        with contextlib.ExitStack() as stack:
            stack.callback(self._close_queue)
            # A configuration error (say, no OPENAI_API_KEY) stops us before anything starts.
            summarizer = o.daemon_settings("redis://", self.prefix).make_summarizer()
            url, engine = stack.enter_context(_engine(o.redis_url))
            settings = o.daemon_settings(url, self.prefix)
            self.client = client = redis.Redis.from_url(url, socket_timeout=10)
            stack.callback(client.close)
            client.ping()
            if o.redis_url:  # a shared server: remove exactly our keys afterwards
                stack.callback(delete_prefix, client, self.prefix)
            self.admin = Admin(client, self.schema)
            label = getattr(summarizer, "name", settings.summarizer)
            if o.summarizer == "openai" and o.openai_base_url:
                label += f" at {o.openai_base_url}"
            self.view = view = self._create_sessions(client, engine, label)
            stack.enter_context(_logs_into(view))
            stack.callback(self._stop_writers)
            self._start_writers(url, view)
            self.reporter.start(view)
            try:
                asyncio.run(self._supervise(settings, summarizer))
                view.phase = "verifying"
                self._stop_writers()
                facts = self._gather()
                checks = verify(facts)
                view.phase = "done"
                view.ended = time.monotonic()
            finally:
                self.reporter.stop(view)
            return self._result(facts, checks)

    def _close_queue(self) -> None:
        self.events.close()
        self.events.join_thread()


def run_demo(options: DemoOptions, reporter: Reporter | None = None) -> DemoResult:
    """Run the demo, showing it through ``reporter`` (default: plain lines on stdout), and
    return the verification. Everything it started is stopped, and with ``redis_url`` every
    key it wrote is deleted, before it returns (also on errors and Ctrl-C)."""
    return _DemoRun(options, reporter or PlainReporter(sys.stdout)).run()


def run_cli(options: DemoOptions, *, as_json: bool, live: bool) -> int:
    """``convstate demo``: the live view (or plain progress), then the verification summary
    (as JSON on stdout with ``as_json``; progress then goes to stderr). Returns the exit
    code: 0 if every check passed, else 1."""
    reporter = make_reporter(sys.stderr if as_json else sys.stdout, live=live)
    result = run_demo(options, reporter)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2), flush=True)
    else:
        reporter.summary(result)
    return 0 if result.passed else 1
