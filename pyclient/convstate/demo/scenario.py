"""The scripted conversations: a topic per session, user/assistant exchanges filled from
templates, every third one with a tool call and its result (deterministic per session)."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


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
