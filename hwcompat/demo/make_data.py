"""Write the bundled demo dataset: entity extraction, text -> JSON of entities.

    python -m hwcompat.demo.make_data      # rewrites hwcompat/demo/data/{train,eval,pairs_train,pairs_eval}.jsonl

Deterministic (fixed seed), so the committed files are reproducible. Sentences
come from templates over pools of people, places and organisations; eval rows
use combinations never seen in train. The answer is compact JSON with the
three keys always present, which is what an extraction adapter should learn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = ["Alice Martin", "Bruno Keller", "Chen Wei", "Dana Okafor", "Elena Petrova", "Farid Haddad", "Grace Liu",
          "Hiro Tanaka", "Ines Duarte", "Jonas Berg", "Kavya Rao", "Liam O'Brien", "Maya Cohen", "Nils Larsen",
          "Olga Ivanova", "Pablo Ruiz", "Quinn Harper", "Rosa Bianchi", "Samir Patel", "Tara Nguyen", "Umar Sheikh",
          "Vera Novak", "Wen Zhao", "Ximena Flores", "Yusuf Demir", "Zoe Fischer"]
PLACES = ["Paris", "Berlin", "Lagos", "Osaka", "Lisbon", "Toronto", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin",
          "Madrid", "Seoul", "Cairo", "Austin", "Krakow", "Porto", "Quito", "Zurich", "Melbourne"]
ORGS = ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Stark Industries", "Wayne Enterprises", "Hooli",
        "Vandelay Imports", "Soylent Foods", "Cyberdyne", "Tyrell Systems", "Wonka Industries", "Aperture Science",
        "Massive Dynamic", "Oscorp"]

TEMPLATES = [
    ("{p0} moved from {l0} to {l1} to join {o0}.", ["p0"], ["l0", "l1"], ["o0"]),
    ("{o0} opened a new office in {l0}, led by {p0}.", ["p0"], ["l0"], ["o0"]),
    ("{p0} and {p1} met in {l0} last spring.", ["p0", "p1"], ["l0"], []),
    ("The report by {p0} criticised {o0} and {o1}.", ["p0"], [], ["o0", "o1"]),
    ("{o0} signed a supply deal with {o1} in {l0}.", [], ["l0"], ["o0", "o1"]),
    ("After years at {o0}, {p0} retired to {l0}.", ["p0"], ["l0"], ["o0"]),
    ("{p0} flew to {l0} on Monday.", ["p0"], ["l0"], []),
    ("Investors in {l0} praised {o0} after the launch.", [], ["l0"], ["o0"]),
    ("{p0} told reporters that {p1} will lead the {l0} team.", ["p0", "p1"], ["l0"], []),
    ("Shares of {o0} fell sharply on Tuesday.", [], [], ["o0"]),
    ("{p0}, a nurse from {l0}, won the city marathon.", ["p0"], ["l0"], []),
    ("The conference in {l0} was sponsored by {o0}; {p0} gave the keynote.", ["p0"], ["l0"], ["o0"]),
    ("It rained all week and nobody went outside.", [], [], []),
    ("{p0} hired {p1} and {p2} for the new {o0} lab in {l0}.", ["p0", "p1", "p2"], ["l0"], ["o0"]),
    ("A delegation from {l0} visited {l1} and {l2}.", [], ["l0", "l1", "l2"], []),
    ("{o0} acquired {o1} for an undisclosed sum.", [], [], ["o0", "o1"]),
]

INSTRUCTION = ("Extract the people, places and organizations mentioned in the text. Answer with JSON only, "
               'like {"people": [], "places": [], "organizations": []}.\n\nText: ')


def _row(rng: random.Random, people: list[str], places: list[str], orgs: list[str]) -> tuple[dict, str]:
    text, pk, lk, ok = rng.choice(TEMPLATES)
    p = rng.sample(people, 3)
    loc = rng.sample(places, 3)
    o = rng.sample(orgs, 2)
    fill = {f"p{i}": p[i] for i in range(3)} | {f"l{i}": loc[i] for i in range(3)} | {f"o{i}": o[i] for i in range(2)}
    sentence = text.format(**fill)
    answer = {"people": [fill[k] for k in pk], "places": [fill[k] for k in lk],
              "organizations": [fill[k] for k in ok]}
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": json.dumps(answer)}]}, sentence


def build(n_train: int = 340, n_eval: int = 60, seed: int = 7) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    train, evals = [], []
    while len(train) < n_train:
        row, sentence = _row(rng, PEOPLE, PLACES, ORGS)
        if sentence not in seen:
            seen.add(sentence)
            train.append(row)
    while len(evals) < n_eval:
        row, sentence = _row(rng, PEOPLE, PLACES, ORGS)
        if sentence not in seen:  # never a sentence the adapter trained on
            seen.add(sentence)
            evals.append(row)
    return train, evals


def _wrong(answer: dict, rng: random.Random) -> dict:
    """A plausible wrong extraction, drawn from the errors the SFT demo model makes: it fills an empty category
    (with an entity from another one, or an invented one) far more often than it moves or drops one (measured on
    80 training prompts: 81 duplicated, 38 invented, 21 moved, 1 missing). Pairs that only moved or dropped
    entities taught it to add more, and DPO on them lowered its field F1; these teach what it gets wrong. Dropped
    entities stay frequent as rejected answers, so the lesson is "no invented entities", not "fewer entities"
    (with fewer of them, DPO's pull towards shorter answers cost recall)."""
    filled = [k for k in answer if answer[k]]
    empty = [k for k in answer if not answer[k]]
    wrong = {k: list(v) for k, v in answer.items()}
    kind = rng.choices(["duplicate", "invent", "move", "drop"], weights=[30, 20, 15, 35])[0]
    if not filled or (empty and kind in ("duplicate", "invent")):
        key = rng.choice(empty)
        everything = [e for k in filled for e in answer[k]]
        if kind == "duplicate" and everything:
            wrong[key].append(rng.choice(everything))
        else:
            pool = {"people": PEOPLE, "places": PLACES, "organizations": ORGS}[key]
            wrong[key].append(rng.choice([e for e in pool if e not in answer[key]]))
        return wrong
    key = rng.choice(filled)
    entity = wrong[key].pop(rng.randrange(len(wrong[key])))
    if kind != "drop":  # moved into another category
        wrong[rng.choice([k for k in answer if k != key])].append(entity)
    return wrong


def pairs(rows: list[dict], seed: int) -> list[dict]:
    """Preference pairs for the demo's DPO stage: chosen = the correct JSON, rejected = a plausible wrong one."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        prompt, answer = row["messages"][0]["content"], json.loads(row["messages"][1]["content"])
        out.append({"prompt": prompt, "chosen": json.dumps(answer), "rejected": json.dumps(_wrong(answer, rng))})
    return out


def main() -> None:
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    train, evals = build()
    files = (("train.jsonl", train), ("eval.jsonl", evals), ("pairs_train.jsonl", pairs(train, 11)),
             ("pairs_eval.jsonl", pairs(evals, 13)))
    for name, rows in files:
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {out / name}")


if __name__ == "__main__":
    main()
