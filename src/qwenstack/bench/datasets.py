"""What a benchmark asks: prompts with the number of tokens to generate for each.

Lengths are counted by the server (the `usage` it returns), not here: the bench needs no
tokenizer, so it works against any OpenAI-compatible endpoint and model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenstack.errors import SetupError

# Common English words that Qwen3's and most BPE vocabularies hold as one token each (with the
# leading space), so a random prompt of N words is close to N tokens.
WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by hot"
    " word but what some we can out other were all there when up use your how said an each she"
    " which do their time if will way about many then them write would like so these her long"
    " make thing see him two has look more day could go come did number sound no most people my"
    " over know water than call first who may down side been now find any new work part take get"
    " place made live where after back little only round man year came show every good me give"
    " our under name very through just form great think say help low line differ turn cause much"
).split()


# Where the repository's shared data sits when the bench runs from a clone's root.
DEFAULT_CMRC = Path("../shared/data/cmrc2018_trial.json")
DATASETS = ("random", "sharegpt", "cmrc")


class DatasetError(SetupError):
    """A dataset file or length setting that cannot be used."""


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int


def load(
    name: str,
    count: int,
    *,
    path: Path | None = None,
    input_len: int = 128,
    output_len: int | None = None,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[Prompt]:
    """`count` prompts from the named dataset; output_len None: 64, or ShareGPT's replies."""
    if name == "random":
        return random_prompts(count, input_len, output_len or 64, range_ratio, seed)
    if name == "sharegpt":
        if path is None:
            raise DatasetError("--dataset sharegpt needs --dataset-path FILE.json")
        return sharegpt_prompts(path, count, output_len, seed)
    if name == "cmrc":
        return cmrc_prompts(path or DEFAULT_CMRC, count, output_len or 64, seed)
    raise DatasetError(f"--dataset {name}: use one of {', '.join(DATASETS)}")


def random_prompts(
    count: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0
) -> list[Prompt]:
    """Prompts of random words, lengths drawn uniformly from len x [1 - ratio, 1 + ratio].

    Each prompt starts with its index, so no two share a prefix a cache could serve.
    """
    if input_len < 1 or output_len < 1:
        raise DatasetError("--input-len and --output-len must be 1 or more")
    if not 0 <= range_ratio < 1:
        raise DatasetError("--range-ratio must be in [0, 1)")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        low, high = round(length * (1 - range_ratio)), round(length * (1 + range_ratio))
        return max(1, rng.randint(low, high))

    return [
        # The prompt's length is drawn before the output's, so a seed gives the same prompts.
        Prompt(
            f"{i} " + " ".join(rng.choices(WORDS, k=max(0, draw(input_len) - 1))),
            draw(output_len),
        )
        for i in range(count)
    ]


def sharegpt_prompts(path: Path, count: int, output_len: int | None, seed: int = 0) -> list[Prompt]:
    """First human turns of a ShareGPT-style file: [{"conversations": [{"from", "value"}...]}].

    Without --output-len each prompt asks for about as many tokens as the recorded reply had,
    estimated at 4 bytes per token (no tokenizer here), at most 4,096.
    """
    data = _load_json(path)
    pairs = []
    for item in data if isinstance(data, list) else []:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, reply = turns[0], turns[1]
        if not (isinstance(first, dict) and isinstance(reply, dict)):
            continue
        if first.get("from") in ("human", "user") and isinstance(first.get("value"), str) \
                and isinstance(reply.get("value"), str) and first["value"].strip():
            pairs.append((first["value"], reply["value"]))
    if not pairs:
        raise DatasetError(
            f"{path}: no conversations found; expected a JSON list of "
            '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}'
        )
    rng = random.Random(seed)
    chosen = [pairs[rng.randrange(len(pairs))] for _ in range(count)]
    return [
        Prompt(question, output_len or min(4096, max(1, len(reply.encode()) // 4)))
        for question, reply in chosen
    ]


def cmrc_prompts(path: Path, count: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """Questions of CMRC 2018 (SQuAD-style JSON), each with its paragraph, as a reading task."""
    data = _load_json(path)
    questions = [
        f"{paragraph['context']}\n\n根据上文回答：{qa['question']}"
        for article in (data.get("data", []) if isinstance(data, dict) else [])
        for paragraph in article.get("paragraphs", [])
        for qa in paragraph.get("qas", [])
    ]
    if not questions:
        raise DatasetError(
            f"{path}: no questions found; expected SQuAD-style JSON (data/paragraphs/qas)"
        )
    rng = random.Random(seed)
    return [Prompt(questions[rng.randrange(len(questions))], output_len) for _ in range(count)]


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from None
