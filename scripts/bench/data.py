"""What the measurements store: chat messages, prefilled sessions, and the scripted travel
conversation of [6]."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from bench.core import PREFILL_BATCH, chat
from convstate import ConversationStore

# -- data ----------------------------------------------------------------------------------------


def prefill(store: ConversationStore, sid: str, count: int, *, system: str | None) -> None:
    """Create ``sid`` holding ``count`` alternating user/assistant messages (append_many)."""
    store.delete_session(sid)
    store.create_session(sid, system=system)
    done = 0
    while done < count:
        n = min(PREFILL_BATCH, count - done)
        store.append_many(sid, [chat(done + i) for i in range(n)])
        done += n


def rpush_many(client: redis.Redis, key: str, values: Sequence[str | bytes]) -> None:
    client.delete(key)
    for i in range(0, len(values), 1000):
        client.rpush(key, *values[i : i + 1000])


def conv_pairs(store: Any, template: str, live: str) -> list[tuple[str, str]]:
    t, s = store.ops.session_keys(template), store.ops.session_keys(live)
    return [(t.msgs, s.msgs), (t.meta, s.meta), (t.ids, s.ids), (t.idlog, s.idlog)]


#: The scripted conversation of [6]: travel planning, with the names, numbers, decisions and
#: preferences the extractive summarizer looks for.
CITIES = ("Lisbon", "Porto", "Sintra", "Kyoto", "Osaka", "Nara", "Seville", "Granada")
NAMES = ("Anna", "Marco", "Yuki", "Priya", "Tom")
THINGS = ("hotel", "train", "museum tickets", "dinner", "guided tour", "rental car", "ferry")
USER_SENTENCES = (
    "Can we add {n} nights in {city} after {city2}?",
    "My budget for the {thing} is about {price} euros.",
    "{name} prefers quiet places, so please avoid the busiest streets.",
    "What time does the {thing} to {city} leave on {day}?",
    "I decided to book the {thing} for {day} at {hour}:00.",
    "Is it worth visiting {city} if we only have {n} hours?",
    "Please remember that {name} is vegetarian.",
    "Could you compare the {thing} in {city} with the one in {city2}?",
)
ASSISTANT_SENTENCES = (
    "The {thing} in {city} costs around {price} euros per person.",
    "I would suggest {n} nights in {city}, then a morning train to {city2}.",
    "On {day} the {thing} opens at {hour}:00 and gets crowded by noon.",
    "{name} might enjoy the old town of {city}, which is quiet in the evening.",
    "Booking the {thing} two weeks ahead usually saves about {n}0 percent.",
    "The walk from the station to the {thing} takes about {n}0 minutes.",
    "If the weather turns, the {thing} in {city2} is a good indoor alternative.",
    "I have noted that the total so far is about {price} euros.",
    "Let me know whether you want me to draft a day-by-day plan for {city}.",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def sentence(rng: random.Random, template: str) -> str:
    return template.format(
        n=rng.randint(2, 9),
        city=rng.choice(CITIES),
        city2=rng.choice(CITIES),
        thing=rng.choice(THINGS),
        price=rng.randint(3, 120) * 10,
        name=rng.choice(NAMES),
        day=rng.choice(DAYS),
        hour=rng.randint(7, 21),
    )


def conversation_message(rng: random.Random, role: str) -> dict[str, Any]:
    pool, count = (
        (USER_SENTENCES, rng.randint(2, 4))
        if role == "user"
        else (ASSISTANT_SENTENCES, rng.randint(4, 8))
    )
    return {
        "role": role,
        "content": " ".join(sentence(rng, rng.choice(pool)) for _ in range(count)),
    }
