"""The embedded demo: a deterministic knowledge base of made-up people and questions about them.

Every fact is random, so an answer can only be found by reading the retrieved passage:
a model that answers the test questions has learned to retrieve and copy, not to recall.
Each person has one fact, in a passage of its own; all facts put the value at the same
word position, so a small generator trained from scratch learns to copy within minutes.
"""

import json
import random
from pathlib import Path

SYLLABLES = [
    "ba",
    "ko",
    "ri",
    "tel",
    "mun",
    "zor",
    "qui",
    "van",
    "del",
    "sha",
    "pem",
    "lor",
    "gra",
    "hux",
    "fen",
    "dri",
    "mo",
    "sel",
    "tav",
    "nix",
    "yor",
    "cal",
    "bre",
    "ost",
]
FACTS = [  # (passage template, question template); one fact a passage, the value always at one position
    ("{name} lives in {value} .", "where does {name} live ?"),
    ("{name} eats at {value} .", "where does {name} eat ?"),
    ("{name} works for {value} .", "who does {name} work for ?"),
]


def _made_up_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def _distinct_words(rng: random.Random, count: int, syllables: int) -> list[str]:
    if count > len(SYLLABLES) ** syllables:
        raise ValueError(f"cannot make {count} distinct words of {syllables} syllables")
    words: set[str] = set()
    while len(words) < count:
        words.add(_made_up_word(rng, syllables))
    return sorted(words)


def write_demo_data(
    out_dir: str | Path,
    num_entities: int = 3600,
    num_values: int = 300,
    val_size: int = 100,
    test_size: int = 200,
    seed: int = 0,
) -> Path:
    """Write `kb.jsonl` (title, text) and `train/val/test.jsonl` (question, answers, gold_titles) into out_dir.

    The same arguments always give the same files; val and test take at most a tenth each.
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = _distinct_words(rng, num_entities, 3)
    last = _distinct_words(rng, num_entities, 3)
    rng.shuffle(last)
    values = [_distinct_words(rng, num_values, 3) for _ in FACTS]

    passages, questions = [], []
    for first_name, last_name in zip(first, last):
        name = f"{first_name} {last_name}"
        fact = rng.randrange(len(FACTS))
        (sentence, question), value = FACTS[fact], rng.choice(values[fact])
        passages.append({"title": name, "text": sentence.format(name=name, value=value)})
        questions.append({"question": question.format(name=name), "answers": [value], "gold_titles": [name]})

    rng.shuffle(questions)
    test_size, val_size = min(test_size, len(questions) // 10), min(val_size, len(questions) // 10)
    splits = {
        "test": questions[:test_size],
        "val": questions[test_size : test_size + val_size],
        "train": questions[test_size + val_size :],
    }
    write_jsonl(out / "kb.jsonl", passages)
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
