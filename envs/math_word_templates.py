"""Templates that generate `envs/data/math_word_problems.jsonl`, so every answer is computed,
not typed. Each template draws numbers, then writes the question, a worked solution whose
equations are exact ("3 * 12 = 36"), and the integer answer.

Regenerate (deterministic): python -m envs.math_word_templates
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

DATA_PATH = Path(__file__).parent / "data" / "math_word_problems.jsonl"
SEED = 2024
PER_TEMPLATE = 13
TEST_PER_TEMPLATE = 2

NAMES = [
    "Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kiko",
    "Liam", "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera",
]  # fmt: skip
ITEMS = ["apples", "pencils", "stickers", "crayons", "marbles", "buttons", "shells", "beads"]

Generated = tuple[str, list[str], int]  # question, solution steps, answer
Template = Callable[[random.Random], Generated]


def boxes_left(r: random.Random) -> Generated:
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(3, 15)
    c = r.randint(1, a * b - 1)
    q = f"{n} has {a} boxes with {b} {item} in each box. {n} gives away {c} {item}. How many {item} does {n} have left?"
    return (
        q,
        [
            f"{n} starts with {a} * {b} = {a * b} {item}.",
            f"After giving some away, {a * b} - {c} = {a * b - c} are left.",
        ],
        a * b - c,
    )


def shopping_total(r: random.Random) -> Generated:
    n, a, p, q_ = r.choice(NAMES), r.randint(2, 8), r.randint(2, 9), r.randint(15, 60)
    q = f"{n} buys {a} notebooks that cost ${p} each and a backpack that costs ${q_}. How many dollars does {n} spend in total?"
    return (
        q,
        [
            f"The notebooks cost {a} * {p} = {a * p} dollars.",
            f"In total {a * p} + {q_} = {a * p + q_} dollars.",
        ],
        a * p + q_,
    )


def change(r: random.Random) -> Generated:
    n, bill = r.choice(NAMES), r.choice([20, 50, 100])
    k = r.randint(2, 6)
    p = r.randint(2, (bill - 1) // k)
    q = f"{n} buys {k} sandwiches at ${p} each and pays with a ${bill} bill. How much change, in dollars, does {n} get?"
    return (
        q,
        [
            f"The sandwiches cost {k} * {p} = {k * p} dollars.",
            f"The change is {bill} - {k * p} = {bill - k * p} dollars.",
        ],
        bill - k * p,
    )


def pages_left(r: random.Random) -> Generated:
    n, p, d = r.choice(NAMES), r.randint(5, 30), r.randint(2, 9)
    total = p * d + r.randint(1, 150)
    q = f"A book has {total} pages. {n} reads {p} pages every day for {d} days. How many pages are left to read?"
    return (
        q,
        [
            f"{n} reads {p} * {d} = {p * d} pages.",
            f"That leaves {total} - {p * d} = {total - p * d} pages.",
        ],
        total - p * d,
    )


def two_legs(r: random.Random) -> Generated:
    s1, h1, s2, h2 = r.randint(30, 80), r.randint(2, 5), r.randint(30, 80), r.randint(1, 4)
    q = f"A train travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for {h2} hours. How many miles does it travel in total?"
    steps = [
        f"The first part is {s1} * {h1} = {s1 * h1} miles.",
        f"The second part is {s2} * {h2} = {s2 * h2} miles.",
        f"In total {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} miles.",
    ]
    return q, steps, s1 * h1 + s2 * h2


def share_equally(r: random.Random) -> Generated:
    n, k, each = r.choice(NAMES), r.randint(2, 9), r.randint(3, 12)
    q = f"{n} bakes {k * each} cookies and shares them equally among {k} friends. How many cookies does each friend get?"
    return q, [f"Each friend gets {k * each} / {k} = {each} cookies."], each


def leftover(r: random.Random) -> Generated:
    n, k, packs = r.choice(NAMES), r.randint(3, 9), r.randint(3, 12)
    rest = r.randint(1, k - 1)
    total = k * packs + rest
    q = f"{n} has {total} stickers and puts them into packs of {k}. How many stickers are left over after making as many full packs as possible?"
    return (
        q,
        [
            f"{packs} full packs use {packs} * {k} = {packs * k} stickers.",
            f"So {total} - {packs * k} = {rest} are left over.",
        ],
        rest,
    )


def savings_weeks(r: random.Random) -> Generated:
    n, s, w, have = r.choice(NAMES), r.randint(5, 25), r.randint(3, 12), r.randint(10, 60)
    goal = have + s * w
    q = f"{n} wants a bike that costs ${goal}. {n} already has ${have} and saves ${s} each week. How many weeks will it take to have enough money?"
    return (
        q,
        [
            f"{n} still needs {goal} - {have} = {s * w} dollars.",
            f"That takes {s * w} / {s} = {w} weeks.",
        ],
        w,
    )


def ages(r: random.Random) -> Generated:
    a, b = r.sample(NAMES, 2)
    x, y, z = r.randint(3, 15), r.randint(1, 9), r.randint(2, 10)
    older = 2 * x + y
    q = f"{a} is {x} years old. {b} is {y} years older than twice {a}'s age. How old will {b} be in {z} years?"
    steps = [
        f"Twice {a}'s age is 2 * {x} = {2 * x}.",
        f"{b} is {2 * x} + {y} = {older} years old.",
        f"In {z} years {b} will be {older} + {z} = {older + z}.",
    ]
    return q, steps, older + z


def attendance(r: random.Random) -> Generated:
    c, s = r.randint(3, 12), r.randint(18, 32)
    t = r.randint(1, 20)
    q = f"A school has {c} classes with {s} students each. On Monday, {t} students are absent. How many students are present?"
    return (
        q,
        [
            f"The school has {c} * {s} = {c * s} students.",
            f"Present are {c * s} - {t} = {c * s - t} students.",
        ],
        c * s - t,
    )


def garden(r: random.Random) -> Generated:
    rows, p, k = r.randint(2, 9), r.randint(3, 12), r.randint(4, 15)
    q = f"A garden has {rows} rows with {p} tomato plants in each row. Each plant grows {k} tomatoes. How many tomatoes grow in the garden?"
    return (
        q,
        [
            f"There are {rows} * {p} = {rows * p} plants.",
            f"They grow {rows * p} * {k} = {rows * p * k} tomatoes.",
        ],
        rows * p * k,
    )


def wages(r: random.Random) -> Generated:
    n, w, h, d = r.choice(NAMES), r.randint(9, 25), r.randint(3, 8), r.randint(2, 6)
    q = f"{n} earns ${w} per hour and works {h} hours a day for {d} days. How many dollars does {n} earn?"
    return (
        q,
        [
            f"Each day {n} earns {w} * {h} = {w * h} dollars.",
            f"Over {d} days that is {w * h} * {d} = {w * h * d} dollars.",
        ],
        w * h * d,
    )


def fence(r: random.Random) -> Generated:
    length, width = r.randint(8, 60), r.randint(4, 40)
    q = f"A rectangular yard is {length} meters long and {width} meters wide. How many meters of fence are needed to go all the way around it?"
    half = length + width
    return (
        q,
        [
            f"One length and one width make {length} + {width} = {half} meters.",
            f"The fence is 2 * {half} = {2 * half} meters.",
        ],
        2 * half,
    )


def discount(r: random.Random) -> Generated:
    price, pct = 10 * r.randint(2, 20), 10 * r.randint(1, 5)
    off = price * pct // 100
    q = f"A jacket costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
    return (
        q,
        [
            f"The discount is {price} * {pct} / 100 = {off} dollars.",
            f"The sale price is {price} - {off} = {price - off} dollars.",
        ],
        price - off,
    )


def marbles(r: random.Random) -> Generated:
    a, b, c = r.sample(NAMES, 3)
    x, m = r.randint(4, 20), r.randint(2, 4)
    f = r.randint(1, m * x - 1)
    bx, cx = m * x, m * x - f
    q = f"{a} has {x} marbles. {b} has {m} times as many marbles as {a}. {c} has {f} fewer marbles than {b}. How many marbles do they have altogether?"
    steps = [
        f"{b} has {m} * {x} = {bx} marbles.",
        f"{c} has {bx} - {f} = {cx} marbles.",
        f"Altogether {x} + {bx} + {cx} = {x + bx + cx} marbles.",
    ]
    return q, steps, x + bx + cx


def bus(r: random.Random) -> Generated:
    start = r.randint(15, 50)
    off1, on1 = r.randint(1, start - 1), r.randint(1, 20)
    mid = start - off1 + on1
    off2 = r.randint(1, mid - 1)
    q = f"A bus leaves the station with {start} passengers. At the first stop, {off1} people get off and {on1} get on. At the second stop, {off2} people get off. How many passengers are on the bus now?"
    steps = [
        f"After people get off: {start} - {off1} = {start - off1}.",
        f"After people get on: {start - off1} + {on1} = {mid}.",
        f"After the second stop: {mid} - {off2} = {mid - off2}.",
    ]
    return q, steps, mid - off2


def movie_minutes(r: random.Random) -> Generated:
    h, m = r.randint(1, 3), r.randint(1, 59)
    q = f"A movie is {h} hours and {m} minutes long. How many minutes long is it?"
    return (
        q,
        [
            f"{h} hours is {h} * 60 = {h * 60} minutes.",
            f"Adding the rest gives {h * 60} + {m} = {h * 60 + m} minutes.",
        ],
        h * 60 + m,
    )


def eggs(r: random.Random) -> Generated:
    n, d = r.choice(NAMES), r.randint(1, 6)
    u = r.randint(1, 12 * d - 1)
    q = f"{n} buys {d} dozen eggs and uses {u} of them to bake. How many eggs are left?"
    return (
        q,
        [
            f"{d} dozen is {d} * 12 = {d * 12} eggs.",
            f"Left over are {d * 12} - {u} = {d * 12 - u} eggs.",
        ],
        d * 12 - u,
    )


def fuel_cost(r: random.Random) -> Generated:
    mpg, gallons, price = r.randint(20, 40), r.randint(2, 12), r.randint(3, 6)
    q = f"A car goes {mpg} miles on one gallon of gas. A trip is {mpg * gallons} miles long, and gas costs ${price} per gallon. How many dollars does the gas for the trip cost?"
    steps = [
        f"The trip needs {mpg * gallons} / {mpg} = {gallons} gallons.",
        f"The gas costs {gallons} * {price} = {gallons * price} dollars.",
    ]
    return q, steps, gallons * price


def cards_half(r: random.Random) -> Generated:
    n, k, y = r.choice(NAMES), r.randint(2, 6), r.randint(5, 12)
    x = 2 * r.randint(5, 30) + (k * y) % 2  # keeps the total even
    total = x + k * y
    q = f"{n} has {x} trading cards and buys {k} packs with {y} cards in each pack. Then {n} gives half of all the cards to a friend. How many cards does {n} have now?"
    steps = [
        f"The packs hold {k} * {y} = {k * y} cards.",
        f"{n} then has {x} + {k * y} = {total} cards.",
        f"Half of them is {total} / 2 = {total // 2} cards.",
    ]
    return q, steps, total // 2


def running_week(r: random.Random) -> Generated:
    n, k, sat = r.choice(NAMES), r.randint(2, 12), r.randint(5, 25)
    q = f"{n} runs {k} kilometers on each of the 5 weekdays and {sat} kilometers on Saturday. How many kilometers does {n} run that week?"
    return (
        q,
        [
            f"On weekdays {n} runs 5 * {k} = {5 * k} kilometers.",
            f"With Saturday that is {5 * k} + {sat} = {5 * k + sat} kilometers.",
        ],
        5 * k + sat,
    )


def chairs(r: random.Random) -> Generated:
    k, rows = r.randint(6, 15), r.randint(5, 20)
    removed = r.randint(1, rows - 1)
    q = f"A hall has {k * rows} chairs arranged in rows of {k}. Then {removed} rows are taken away. How many chairs are left?"
    steps = [
        f"The removed rows hold {removed} * {k} = {removed * k} chairs.",
        f"Left are {k * rows} - {removed * k} = {k * (rows - removed)} chairs.",
    ]
    return q, steps, k * (rows - removed)


def fruit_basket(r: random.Random) -> Generated:
    a, more = r.randint(2, 15), r.randint(1, 10)
    oranges = a + more
    q = f"A fruit basket has {a} apples, {more} more oranges than apples, and twice as many bananas as oranges. How many pieces of fruit are in the basket?"
    steps = [
        f"There are {a} + {more} = {oranges} oranges.",
        f"There are 2 * {oranges} = {2 * oranges} bananas.",
        f"In total {a} + {oranges} + {2 * oranges} = {a + 3 * oranges} pieces of fruit.",
    ]
    return q, steps, a + 3 * oranges


def pizza(r: random.Random) -> Generated:
    k, s = r.randint(2, 6), r.choice([6, 8, 10, 12])
    people = r.randint(2, 9)
    e = r.randint(1, max(1, (k * s - 1) // people))
    q = f"{k} pizzas are each cut into {s} slices. {people} people each eat {e} slices. How many slices are left?"
    steps = [
        f"There are {k} * {s} = {k * s} slices.",
        f"The people eat {people} * {e} = {people * e} slices.",
        f"Left are {k * s} - {people * e} = {k * s - people * e} slices.",
    ]
    return q, steps, k * s - people * e


TEMPLATES: list[Template] = [
    boxes_left, shopping_total, change, pages_left, two_legs, share_equally, leftover,
    savings_weeks, ages, attendance, garden, wages, fence, discount, marbles, bus,
    movie_minutes, eggs, fuel_cost, cards_half, running_week, chairs, fruit_basket, pizza,
]  # fmt: skip


def generate(seed: int = SEED) -> list[dict[str, object]]:
    """PER_TEMPLATE distinct problems per template; the last TEST_PER_TEMPLATE are the test split."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    seen: set[str] = set()
    for template in TEMPLATES:
        made = 0
        while made < PER_TEMPLATE:
            question, steps, answer = template(rng)
            if question in seen:
                continue
            seen.add(question)
            split = "test" if made >= PER_TEMPLATE - TEST_PER_TEMPLATE else "train"
            solution = " ".join(steps) + f" The answer is {answer}."
            rows.append(
                {
                    "id": f"{template.__name__}-{made}",
                    "question": question,
                    "solution": solution,
                    "answer": answer,
                    "split": split,
                }
            )
            made += 1
    return rows


def main() -> None:
    lines = [json.dumps(row) for row in generate()]
    DATA_PATH.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} problems to {DATA_PATH}")


if __name__ == "__main__":
    main()
