"""Fine-tuning tasks with checkable answers, generated offline: `nanogemma task extract --out DIR`.

**extract** — structured extraction, a job people fine-tune small models for: a sentence describing an
order, written in one of many phrasings (fields in different orders, dates spelled several ways, prices
with or without cents), and the order as one line of JSON with fixed keys, the date normalised to
YYYY-MM-DD:

    user:      Extract the order as JSON (keys: customer, item, quantity, total, city, date).
               On 3 March 2025 Maria Lopez ordered 4 desk lamps for $45.50, to be shipped to Denver.
    assistant: {"customer": "Maria Lopez", "item": "desk lamp", "quantity": 4, "total": 45.5, "city": "Denver", "date": "2025-03-03"}

The answer is a function of the sentence, so exact match is a fair score. Train and test records come
from different random streams, and no test sentence appears in the training file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import NanogemmaError

INSTRUCTION = "Extract the order as JSON (keys: customer, item, quantity, total, city, date)."
FIRST = ["Maria", "James", "Aiko", "Omar", "Lena", "Ravi", "Sofia", "Lucas", "Chen", "Amara", "Pierre", "Ingrid",
         "Mateo", "Yuki", "Fatima", "Noah", "Elena", "Kwame", "Hannah", "Diego", "Priya", "Tomas", "Zara", "Felix"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Patel", "Rossi", "Martin", "Wei", "Okafor", "Dubois",
        "Larsen", "Garcia", "Sato", "Khan", "Brown", "Petrova", "Mensah", "Schmidt", "Alvarez", "Iyer", "Horvat"]
ITEMS = [("desk lamp", "desk lamps"), ("coffee mug", "coffee mugs"), ("backpack", "backpacks"),
         ("phone charger", "phone chargers"), ("yoga mat", "yoga mats"), ("notebook", "notebooks"),
         ("water bottle", "water bottles"), ("office chair", "office chairs"), ("headphone set", "headphone sets"),
         ("wool scarf", "wool scarves"), ("cast iron pan", "cast iron pans"), ("bike helmet", "bike helmets"),
         ("plant pot", "plant pots"), ("keyboard", "keyboards"), ("rain jacket", "rain jackets"),
         ("board game", "board games"), ("tea kettle", "tea kettles"), ("picture frame", "picture frames")]
CITIES = ["Denver", "Lyon", "Osaka", "Nairobi", "Toronto", "Porto", "Krakow", "Austin", "Melbourne", "Seoul",
          "Bergen", "Cusco", "Dublin", "Accra", "Hamburg", "Valencia", "Chennai", "Tallinn", "Boise", "Quebec"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

TEMPLATES = [
    "On {date} {name} ordered {qty} {items} for {price}, to be shipped to {city}.",
    "{name} bought {qty} {items} on {date}; the total was {price} and they go to {city}.",
    "Shipping to {city}: {qty} {items}, ordered by {name} on {date}, {price} in all.",
    "Order placed {date} by {name} — {qty} {items}, total {price}, delivery city {city}.",
    "{name} from {city} paid {price} for {qty} {items} on {date}.",
    "Please send {qty} {items} to {city}. Customer: {name}. Paid {price} on {date}.",
    "A total of {price} was charged to {name} on {date} for {qty} {items} (ship to {city}).",
    "{date}: {qty} {items} for {name}, {city}, {price}.",
]


def _date(rng: random.Random) -> tuple[str, str]:
    """(as written in the sentence, ISO)."""
    y, m, d = rng.randint(2022, 2026), rng.randint(1, 12), rng.randint(1, 28)
    month = MONTHS[m - 1]
    written = rng.choice([f"{d} {month} {y}", f"{month} {d}, {y}", f"{month} {d} {y}", f"{y}-{m:02d}-{d:02d}",
                          f"the {d}{'th' if 10 <= d <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')} "
                          f"of {month} {y}"])
    return written, f"{y}-{m:02d}-{d:02d}"


def extract_example(rng: random.Random) -> dict:
    """One record: {"messages": [user, assistant]}."""
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    one, many = rng.choice(ITEMS)
    qty = rng.randint(1, 12)
    cents = rng.choice([0, 0, rng.randint(1, 99)])
    total = round(qty * rng.randint(3, 120) + cents / 100, 2)
    price = rng.choice([f"${total:.2f}", f"{total:.2f} dollars", f"${total:,.2f}"]) if cents else \
        rng.choice([f"${total:.0f}", f"{total:.0f} dollars", f"${total:.2f}"])
    city = rng.choice(CITIES)
    written, iso = _date(rng)
    sentence = rng.choice(TEMPLATES).format(date=written, name=name, qty=qty, items=one if qty == 1 else many,
                                            price=price, city=city)
    sentence = sentence[0].upper() + sentence[1:]
    answer = json.dumps({"customer": name, "item": one, "quantity": qty, "total": total if cents else int(total),
                         "city": city, "date": iso}, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{sentence}"},
                         {"role": "assistant", "content": answer}]}


TASKS = {"extract": extract_example}


def write_task(name: str, out: str | Path, train: int = 4000, test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write OUT/train.jsonl and OUT/test.jsonl (atomically); returns their paths."""
    if name not in TASKS:
        raise NanogemmaError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    if train < 1 or test < 1:
        raise NanogemmaError("--train and --test must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make = TASKS[name]
    rng_test = random.Random(f"{name}/{seed}/test")
    tests = [make(rng_test) for _ in range(test)]
    seen = {r["messages"][0]["content"] for r in tests}
    rng_train = random.Random(f"{name}/{seed}/train")
    trains: list[dict] = []
    while len(trains) < train:
        r = make(rng_train)
        if r["messages"][0]["content"] not in seen:
            trains.append(r)
    paths = []
    for split, records in (("train", trains), ("test", tests)):
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]
