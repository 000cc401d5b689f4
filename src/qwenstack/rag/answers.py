"""Answer quality (`kb eval --answers`): each question asked of a chat model with the passages
retrieved for it, as a grounded chat asks (prompt.py), over any OpenAI-compatible endpoint (the
gateway by default); the answers scored against the reference answers.

Scores, as CMRC 2018's evaluation computes them for Chinese (and SQuAD's for other text):
exact match after removing punctuation and spaces, and F1 over the longest common substring
of the answer's and a reference's tokens, a token being one Chinese character or one run of
other letters and digits (best over the references). Retrieval's part apart from the model's:
whether the top passage holds a reference answer, and whether a passage the answer cites
([n], as the prompt asks) does.

Requests run concurrently, at most `concurrency` at a time; a request that fails (a context
too long, a timeout) is counted as failed, scores 0 and is kept in the report with its error.
"""

from __future__ import annotations

import asyncio
import logging
import re
import string
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from qwenstack.console import NO_PROGRESS, Progress
from qwenstack.rag.prompt import document_tag, documents_message, grounding_instructions

if TYPE_CHECKING:
    from qwenstack.rag.service import Retrieved

CITATION = re.compile(r"\[(\d{1,3})\]")
# One Chinese character (CJK ideographs, as the CMRC 2018 script takes them), or a run of other
# letters and digits.
TOKEN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]|[^\W_]+")
PUNCTUATION = frozenset(string.punctuation) | frozenset(
    "，。、；：？！“”‘’（）《》〈〉【】『』「」﹃﹄〔〕…—～·～-")
MAX_ERROR_CHARS = 300
# The OpenAI SDK's HTTP client (httpx2) logs each request at info level: a line per question,
# thousands of them, where the progress bar and the summary say what matters.
logging.getLogger("httpx2").setLevel(logging.WARNING)


@dataclass(frozen=True)
class AnswerOptions:
    base_url: str  # an OpenAI-compatible API, with its /v1
    api_key: str | None
    model: str | None  # None: the first chat model the endpoint lists
    max_tokens: int = 128
    concurrency: int = 4
    timeout_s: float = 120.0


@dataclass
class Answered:
    """One question's answer and its scores."""

    question: str
    references: list[str]
    answer: str = ""
    exact_match: float = 0.0
    f1: float = 0.0
    top_holds_answer: bool = False
    cited: list[int] = field(default_factory=list)  # passage numbers the answer cites, from 1
    cited_holds_answer: bool = False
    error: str | None = None


@dataclass
class AnswerReport:
    model: str
    questions: int
    failed: int
    exact_match: float
    f1: float
    top_holds_answer: float
    cited_holds_answer: float
    citing: float  # share of answers that cite a passage
    answers: list[Answered]

    def summary(self) -> dict[str, object]:
        return {name: value for name, value in asdict(self).items() if name != "answers"}


def normalised(text: str) -> str:
    """Lower case, without punctuation or white space (CMRC 2018's exact-match form)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if c not in PUNCTUATION and not c.isspace())


def tokens(text: str) -> list[str]:
    return TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest run of tokens `a` and `b` share, in order (a substring)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b, 1):
            if token == other:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def f1(answer: str, reference: str) -> float:
    predicted, expected = tokens(answer), tokens(reference)
    common = _longest_common_run(predicted, expected)
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(answer: str, reference: str) -> float:
    return float(normalised(answer) == normalised(reference))


def holds(passage: str, references: list[str]) -> bool:
    text = normalised(passage)
    return any(normalised(reference) and normalised(reference) in text
               for reference in references)


def score(item: Answered, passages: list[str]) -> None:
    """Fill in `item`'s scores from its answer and the passages it was given."""
    item.exact_match = max((exact_match(item.answer, r) for r in item.references), default=0.0)
    item.f1 = max((f1(item.answer, r) for r in item.references), default=0.0)
    item.top_holds_answer = bool(passages) and holds(passages[0], item.references)
    item.cited = sorted({number for number in map(int, CITATION.findall(item.answer))
                         if 1 <= number <= len(passages)})
    item.cited_holds_answer = any(holds(passages[n - 1], item.references) for n in item.cited)


def messages(retrieved: list[Retrieved], question: str) -> list[dict[str, str]]:
    """What the gateway's grounded chat sends the model for this question (grounding.py)."""
    tag = document_tag()
    return [{"role": "system", "content": grounding_instructions(tag)},
            {"role": "user", "content": documents_message(retrieved, tag)},
            {"role": "user", "content": question}]


async def ask_all(
    options: AnswerOptions, asked: list[tuple[str, list[str], list[Retrieved]]],
    progress: Progress = NO_PROGRESS,
) -> AnswerReport:
    """Each (question, reference answers, retrieved passages) asked and scored."""
    import openai

    client = openai.AsyncOpenAI(base_url=options.base_url, api_key=options.api_key or "none",
                                max_retries=1, timeout=options.timeout_s)
    async with client:
        model = options.model or await _first_chat_model(client)
        progress.stage(f"asking {model}", len(asked))
        slots = asyncio.Semaphore(options.concurrency)

        async def ask(question: str, references: list[str],
                      retrieved: list[Retrieved]) -> Answered:
            item = Answered(question, references)
            async with slots:
                try:
                    completion = await client.chat.completions.create(
                        model=model, messages=messages(retrieved, question),  # type: ignore[arg-type]
                        max_tokens=options.max_tokens, temperature=0)
                    item.answer = completion.choices[0].message.content or ""
                except openai.OpenAIError as exc:
                    item.error = str(exc)[:MAX_ERROR_CHARS]
            score(item, [entry.hit.text for entry in retrieved])
            progress.advance()
            return item

        answers = await asyncio.gather(*(ask(*entry) for entry in asked))
    return _report(model, list(answers))


async def _first_chat_model(client: Any) -> str:
    """The first model the endpoint lists as a chat model (the gateway says each one's role;
    another server's models are taken as chat models)."""
    page = await client.models.list()
    for card in page.data:
        if (card.model_extra or {}).get("role", "chat") == "chat":
            return str(card.id)
    raise ValueError(f"{client.base_url} lists no chat model; name one with --model.")


def _report(model: str, answers: list[Answered]) -> AnswerReport:
    count = len(answers) or 1

    def share(values: list[float] | list[bool]) -> float:
        return round(sum(values) / count, 4)

    return AnswerReport(
        model=model, questions=len(answers), failed=sum(a.error is not None for a in answers),
        exact_match=share([a.exact_match for a in answers]), f1=share([a.f1 for a in answers]),
        top_holds_answer=share([a.top_holds_answer for a in answers]),
        cited_holds_answer=share([a.cited_holds_answer for a in answers]),
        citing=share([bool(a.cited) for a in answers]), answers=answers,
    )
