"""Write `data/instructions.json`: the project's own instruction-tuning data set.

    python data/make_instructions.py            # rewrites data/instructions.json, byte for byte
    python data/make_instructions.py --out x.json

Every record is Alpaca-style, `{"instruction", "input", "output", "task", "split"}`,
and every answer is short and can be checked exactly. Eight task families, each
with 150 train, 12 or 13 val and 25 test records (1,200 / 100 / 200 in all):

    spam     an SMS (data/sms_spam_collection.tsv, half of them spam)    -> "spam" / "ham"
    phone    the phone number in a message, written 415-555-0199        -> "415-555-0199"
    numbers  every number in a sentence, in order                       -> "12, 4, 150"
    date     "March 5, 2021" or "5 March 2021" as YYYY-MM-DD            -> "2021-03-05"
    json     a person's name, age and city from a sentence, as JSON     -> '{"name": "Ines", "age": 31, ...}'
    spelled  a number from 100 to 999 in words, written in digits       -> "342"
    case     a sentence in lower case or in title case                  -> "The Old Dog Opens The Door."
    botchan  the word after a given word in a Botchan passage           -> "garden"
             (input "Passage: <20-40 words>" then a line "Word: <the word>")

The answers are a label, copied text, or copying with one small mapping (month
names, number words, letter case), so that a 135M model learns each family from
a hundred or so LoRA examples; a base model answers in a sentence, not in exactly
this form. Families that need computation were tried and left out: after 100
LoRA examples each, SmolLM2-135M-Instruct solved 0 of 16 one-step arithmetic word
problems, sorted 3 of 16 word lists, and changed the case of 6 of 16 sentences
right while upper case was one of the choices (16 of 16 with lower and title only).

Each family draws from its own seeded random generator, so the file depends on
nothing but this script and the two source files. No test input is seen in
training: within a family every record has a distinct key (the SMS text; the
phone number; the sentence; the date; the name, age and city; the number; the
Botchan passage), and the Botchan passages of the three splits come from separate
stretches of the book. The script checks this before it writes.
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
import re
from collections.abc import Callable, Hashable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
OUT_PATH = DATA_DIR / "instructions.json"
SMS_PATH = DATA_DIR / "sms_spam_collection.tsv"
BOTCHAN_PATH = DATA_DIR / "botchan.txt"

SEED = 20240611
SPLITS = ("train", "val", "test")
FAMILIES = ("spam", "phone", "numbers", "date", "json", "spelled", "case", "botchan")
TRAIN_PER_FAMILY = 150
TEST_PER_FAMILY = 25
# 100 val records over eight families: the first four get 13, the others 12.
VAL_PER_FAMILY = {family: 13 if index < 4 else 12 for index, family in enumerate(FAMILIES)}

# One generated record before it is assigned a split: (instruction, input, output, key).
# `key` names what must not repeat within a family (see the module docstring).
Draft = tuple[str, str, str, Hashable]

NAMES = [
    "Anna", "Ben", "Carlos", "Diana", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack", "Kofi", "Lena",
    "Maria", "Nina", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yuki", "Zoe",
]


# --- spam ----------------------------------------------------------------------------

SPAM_INSTRUCTIONS = [
    "Is this text message spam or ham?",
    "Classify the following SMS as spam or ham.",
    "Label this message as spam or ham.",
]
SPAM_SHARE = 0.5  # spam is 13% of the collection; trained on that share, a small model answers "ham" too often
SMS_MIN_CHARS, SMS_MAX_CHARS = 20, 160


def read_sms(path: Path) -> dict[str, str]:
    """Unique SMS texts of a usable length, in file order, with their label."""
    labels: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label, sep, text = line.partition("\t")
        if not sep or label not in ("spam", "ham"):
            raise ValueError(f"{path}, line {number}: expected 'spam' or 'ham', a tab, then the text")
        text = " ".join(text.split())
        if SMS_MIN_CHARS <= len(text) <= SMS_MAX_CHARS:
            if labels.setdefault(text, label) != label:
                raise ValueError(f"{path}, line {number}: the same text is labelled both spam and ham")
    return labels


def make_spam(rng: random.Random, counts: dict[str, int]) -> dict[str, list[Draft]]:
    """SMS records, SPAM_SHARE of each split spam; every split takes the next slice of each shuffled class."""
    labels = read_sms(SMS_PATH)
    by_label = {label: [text for text, lab in labels.items() if lab == label] for label in ("spam", "ham")}
    for texts in by_label.values():
        rng.shuffle(texts)
    splits: dict[str, list[Draft]] = {}
    for split in ("test", "val", "train"):
        n_spam = round(counts[split] * SPAM_SHARE)
        picked = [(text, "spam") for text in by_label["spam"][:n_spam]]
        picked += [(text, "ham") for text in by_label["ham"][:counts[split] - n_spam]]
        del by_label["spam"][:n_spam], by_label["ham"][:counts[split] - n_spam]
        rng.shuffle(picked)
        splits[split] = [(rng.choice(SPAM_INSTRUCTIONS), text, label, text) for text, label in picked]
    return splits


# --- phone ---------------------------------------------------------------------------

PHONE_INSTRUCTIONS = [
    "What is the phone number in this message?",
    "Extract the phone number from the text.",
    "Find the phone number in this message.",
]
PHONE_MESSAGES = [
    "Hi, it's {name}. Call me back at {phone} when you get a chance.",
    "{name} called about the flat; the number is {phone}.",
    "Please ring the front desk on {phone} before {hour} pm.",
    "New number! You can reach {name} at {phone} from now on.",
    "Your table for {small} is booked. Questions? Phone {phone}.",
    "Lost dog near the park, answers to {name}. If found call {phone}.",
    "Text {name} on {phone} if the {hour} o'clock train is late.",
    "Plumber: {name}, {small} years of experience, {phone}, open until {hour}.",
    "Meeting moved to room {room}. Dial {phone} to join by phone.",
    "Thanks for your order #{order}. Our help line is {phone}.",
]
PHONE_FORMATS = ["({a}) {b}-{c}", "{a}-{b}-{c}", "{a}.{b}.{c}", "{a} {b} {c}"]


def phone_draft(rng: random.Random) -> Draft:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    parts = {"a": f"{a}", "b": f"{b}", "c": f"{c:04d}"}
    message = rng.choice(PHONE_MESSAGES).format(
        name=rng.choice(NAMES), phone=rng.choice(PHONE_FORMATS).format(**parts), hour=rng.randint(1, 11),
        small=rng.randint(2, 12), room=rng.randint(100, 450), order=rng.randint(10000, 99999),
    )
    answer = "{a}-{b}-{c}".format(**parts)
    return rng.choice(PHONE_INSTRUCTIONS), message, answer, answer


# --- numbers -------------------------------------------------------------------------

NUMBERS_INSTRUCTIONS = [
    "List all the numbers in this sentence, in order.",
    "Extract every number from the text, in the order they appear.",
    "Which numbers appear in this sentence? Give them in order.",
]
NUMBERS_SENTENCES = [
    "Please order {0} chairs, {1} tables and {2} napkins for the party.",
    "Bus {0} leaves in {1} minutes from stop {2}.",
    "We walked {0} miles on Monday and {1} miles on Tuesday.",
    "Room {0} has {1} beds and {2} windows.",
    "The recipe needs {0} eggs, {1} grams of flour and {2} spoons of sugar.",
    "{0} people signed up, but only {1} came to the meeting.",
    "Our team scored {0} points in the first game and {1} in the second.",
    "The shop sold {0} shirts, {1} hats and {2} scarves last week.",
    "The hotel has {0} floors and {1} rooms.",
    "Flight {0} is delayed by {1} minutes at gate {2}.",
    "The library has {0} books on {1} shelves.",
    "He paid {0} dollars for {1} tickets.",
]


def numbers_draft(rng: random.Random) -> Draft:
    sentence = rng.choice(NUMBERS_SENTENCES)
    values = [str(rng.choice([rng.randint(2, 20), rng.randint(21, 999)])) for _ in range(sentence.count("{"))]
    text = sentence.format(*values)
    return rng.choice(NUMBERS_INSTRUCTIONS), text, ", ".join(values), text


# --- date ----------------------------------------------------------------------------

DATE_INSTRUCTIONS = [
    "Rewrite this date in YYYY-MM-DD format.",
    "Convert the date to the form year-month-day, like 2020-01-31.",
    "Write this date as YYYY-MM-DD.",
]


def date_draft(rng: random.Random) -> Draft:
    year, month = rng.randint(1950, 2035), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    name = calendar.month_name[month]
    given = rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}"])
    return rng.choice(DATE_INSTRUCTIONS), given, f"{year:04d}-{month:02d}-{day:02d}", (year, month, day)


# --- json ----------------------------------------------------------------------------

JSON_INSTRUCTIONS = [
    "Turn this sentence into JSON with the keys name, age and city.",
    "Extract the name, age and city as a JSON object.",
    "Write the person's name, age and city as JSON.",
]
JSON_SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, comes from {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "At {age}, {name} moved to {city}.",
    "{city} is home to {name}, who is {age}.",
    "My neighbor {name} is {age} and grew up in {city}.",
]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Dublin", "Seoul", "Quito", "Denver", "Krakow",
          "Manila", "Porto", "Accra", "Hanoi", "Perth", "Boston", "Madrid", "Vienna", "Chicago", "Toronto", "Athens",
          "Mumbai", "Lyon", "Bergen", "Santiago", "Tunis", "Zurich", "Austin", "Glasgow"]


def json_draft(rng: random.Random) -> Draft:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    sentence = rng.choice(JSON_SENTENCES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city})
    return rng.choice(JSON_INSTRUCTIONS), sentence, answer, (name, age, city)


# --- spelled -------------------------------------------------------------------------

SPELLED_INSTRUCTIONS = [
    "Write this number in digits.",
    "Convert the number words to a numeral.",
    "What is this number written with digits?",
]
ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_in_words(number: int) -> str:
    """English words for 1..999: "forty-two", "three hundred and five", "six hundred"."""
    hundreds, rest = divmod(number, 100)
    if rest < 20:
        below_hundred = ONES[rest]
    else:
        below_hundred = TENS[rest // 10] + (f"-{ONES[rest % 10]}" if rest % 10 else "")
    if not hundreds:
        return below_hundred
    return f"{ONES[hundreds]} hundred" + (f" and {below_hundred}" if rest else "")


def spelled_draft(rng: random.Random) -> Draft:
    number = rng.randint(100, 999)  # always three digits: mixing lengths made a model add or drop digits
    return rng.choice(SPELLED_INSTRUCTIONS), number_in_words(number), str(number), number


# --- case ----------------------------------------------------------------------------

CASE_INSTRUCTIONS = {
    "lower": ["Rewrite this sentence in lower case.", "Convert the sentence to all small letters."],
    "title": ["Rewrite this sentence in title case.", "Capitalize the first letter of every word in this sentence."],
}
SUBJECTS = ["the old dog", "my sister", "a young farmer", "the teacher", "our neighbor", "the little cat",
            "a tired student", "the baker", "my friend", "the quiet boy", "a tall woman", "the new doctor"]
VERBS = ["walks to", "paints", "cleans", "visits", "looks at", "runs past", "sings near", "waits by",
         "reads in", "sleeps under", "opens", "finds"]
OBJECTS = ["the red door", "a small garden", "the big window", "the river", "the market", "a green chair",
           "the school", "the bridge", "an empty room", "the kitchen", "the train station", "a wooden box"]
WHEN = ["", "", " every morning", " after lunch", " on sunday", " at night", " in the rain", " before dinner"]


def title_case(text: str) -> str:
    """Every space-separated word with its first letter in upper case."""
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def case_draft(rng: random.Random) -> Draft:
    sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(WHEN)}"
    plain = sentence[0].upper() + sentence[1:] + "."  # the usual way a sentence is written
    target = rng.choice(sorted(CASE_INSTRUCTIONS))
    if target == "lower":
        given, answer = title_case(plain), plain.lower()
    else:
        given, answer = plain, title_case(plain)
    return rng.choice(CASE_INSTRUCTIONS[target]), given, answer, sentence


# --- botchan -------------------------------------------------------------------------

BOTCHAN_INSTRUCTIONS = [
    "Give the word that comes right after the given word in the passage.",
    "Find the word in the passage and answer with the word that follows it.",
    "Which word comes directly after the given word in this passage?",
]
PASSAGE_MIN_WORDS, PASSAGE_MAX_WORDS = 20, 40
# Where the test and val passages come from: the last 15% of the book, and the 10% before it.
TEST_FROM, VAL_FROM = 0.85, 0.75
PLAIN_WORD = re.compile(r"[A-Za-z]+")


def botchan_text(path: Path) -> str:
    """The novel's running text: no Gutenberg header or license, no footnotes or notes, one line."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    story = lines[start:end]
    story = story[next(i for i, line in enumerate(story) if line.strip() == "CHAPTER I"):]
    story = story[:next(i for i, line in enumerate(story) if line.startswith("[A:"))]  # the transcriber's notes
    kept, in_footnote = [], False
    for line in story:
        if line.startswith("[Footnote"):
            in_footnote = True
        if not in_footnote and not re.fullmatch(r"CHAPTER [IVX]+\.?", line.strip()):
            kept.append(line)
        if in_footnote and line.rstrip().endswith("]"):
            in_footnote = False
    text = " ".join(kept)
    text = re.sub(r" ?\[(?:\d+|[A-Z])\]", "", text)  # footnote and note markers
    return " ".join(text.split())


def botchan_passages(path: Path) -> list[str]:
    """Consecutive, non-overlapping runs of whole sentences, PASSAGE_MIN_WORDS to PASSAGE_MAX_WORDS long."""
    sentences = re.findall(r"[^.!?]+[.!?]+[\"']?", botchan_text(path))
    passages, current = [], []
    for sentence in sentences:
        current.append(sentence.strip())
        words = sum(len(s.split()) for s in current)
        if words > PASSAGE_MAX_WORDS:
            current = []
        elif words >= PASSAGE_MIN_WORDS:
            passages.append(" ".join(current))
            current = []
    return passages


def botchan_question(rng: random.Random, passage: str) -> tuple[str, str] | None:
    """A (word, next word) pair: both plain words, the first at least five letters and said once in the passage."""
    tokens = passage.split()
    said = [re.sub(r"[^a-z]", "", token.lower()) for token in tokens]
    candidates = [
        (tokens[i], tokens[i + 1]) for i in range(len(tokens) - 1)
        if PLAIN_WORD.fullmatch(tokens[i]) and PLAIN_WORD.fullmatch(tokens[i + 1])
        and len(tokens[i]) >= 5 and said.count(tokens[i].lower()) == 1
    ]
    return rng.choice(candidates) if candidates else None


def make_botchan(rng: random.Random, counts: dict[str, int]) -> dict[str, list[Draft]]:
    """One question on each of `counts[split]` passages drawn from that split's stretch of the book."""
    passages = botchan_passages(BOTCHAN_PATH)
    n = len(passages)
    regions = {
        "train": passages[:int(n * VAL_FROM)],
        "val": passages[int(n * VAL_FROM):int(n * TEST_FROM)],
        "test": passages[int(n * TEST_FROM):],
    }
    splits: dict[str, list[Draft]] = {}
    for split in SPLITS:
        pool = list(regions[split])
        rng.shuffle(pool)
        drafts: list[Draft] = []
        for passage in pool:
            question = botchan_question(rng, passage)
            if question is None:
                continue
            word, answer = question
            # The word comes last, just before the answer: named in the question before the
            # passage, it stumped a 135M model after 100 LoRA examples (3 of 16 right); named
            # after the passage, the same training got 13 to 15 of 16.
            drafts.append((rng.choice(BOTCHAN_INSTRUCTIONS), f"Passage: {passage}\nWord: {word}", answer, passage))
            if len(drafts) == counts[split]:
                break
        else:
            raise ValueError(f"only {len(drafts)} usable Botchan passages for {split}; {counts[split]} needed")
        splits[split] = drafts
    return splits


# --- assembling the data set ---------------------------------------------------------


def unique_drafts(
    rng: random.Random, draft: Callable[[random.Random], Draft], counts: dict[str, int]
) -> dict[str, list[Draft]]:
    """Draw records until there are enough with distinct keys, then deal them out: test first, val, train."""
    total = sum(counts.values())
    drafts: dict[Hashable, Draft] = {}
    for _ in range(100 * total):
        record = draft(rng)
        drafts.setdefault(record[3], record)
        if len(drafts) == total:
            break
    else:
        raise ValueError(f"{draft.__name__} gave only {len(drafts)} distinct records; {total} needed")
    ordered = list(drafts.values())
    splits, start = {}, 0
    for split in ("test", "val", "train"):
        splits[split] = ordered[start:start + counts[split]]
        start += counts[split]
    return splits


SYNTHETIC = {"phone": phone_draft, "numbers": numbers_draft, "date": date_draft, "json": json_draft,
             "spelled": spelled_draft, "case": case_draft}
FROM_FILES = {"spam": make_spam, "botchan": make_botchan}


def build_records() -> list[dict[str, str]]:
    """All records: the train split, then val, then test; each split shuffled across families."""
    by_split: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for family in FAMILIES:
        rng = random.Random(f"{SEED}-{family}")
        counts = {"train": TRAIN_PER_FAMILY, "val": VAL_PER_FAMILY[family], "test": TEST_PER_FAMILY}
        if family in SYNTHETIC:
            splits = unique_drafts(rng, SYNTHETIC[family], counts)
        else:
            splits = FROM_FILES[family](rng, counts)
        check_family(family, splits, counts)
        for split, drafts in splits.items():
            by_split[split] += [
                {"instruction": instruction, "input": given, "output": output, "task": family, "split": split}
                for instruction, given, output, _ in drafts
            ]
    rng = random.Random(f"{SEED}-order")
    for records in by_split.values():
        rng.shuffle(records)
    return [record for split in SPLITS for record in by_split[split]]


def check_family(family: str, splits: dict[str, list[Draft]], counts: dict[str, int]) -> None:
    """Right counts, tidy answers, and no key or input in two records (so none in two splits)."""
    seen: set[Hashable] = set()
    for split, drafts in splits.items():
        if len(drafts) != counts[split]:
            raise ValueError(f"{family}: {len(drafts)} {split} records; {counts[split]} wanted")
        for instruction, given, output, key in drafts:
            if not output or output != output.strip() or "\n" in output:
                raise ValueError(f"{family}: the answer {output!r} is empty, padded or more than one line")
            for name in {key, given or instruction}:
                if name in seen:
                    raise ValueError(f"{family}: {name!r} is in two records (the second in {split})")
                seen.add(name)


def render(records: list[dict[str, str]]) -> str:
    """A JSON list with one record per line (readable diffs; still one `json.load`)."""
    return "[\n" + ",\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n]\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_PATH, help=f"where to write (default: {OUT_PATH})")
    args = parser.parse_args()
    records = build_records()
    args.out.write_text(render(records), encoding="utf-8", newline="\n")
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
