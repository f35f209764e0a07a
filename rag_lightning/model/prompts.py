"""A causal-LM generator's prompts: `model.prompt` filled in with a passage and a question, as token ids.

The template is cut at its fields ({title}, {text}, {question}) once, inside the tokenizer's chat template when it
has one and the config asks for it (the prompt is then the user's turn, and the assistant's turn is opened), and
its literal pieces are tokenized once. Each field is tokenized on its own, so a passage longer than the room left
by the rest of the prompt loses its last tokens (never the question or the template's end), and a step only
tokenizes its batch's texts. A space that ends a literal piece starts the field that follows instead, so a field's
first word is tokenized as it is in running text (byte-level BPEs mark a word after a space).
"""

from __future__ import annotations

from dataclasses import dataclass

from rag_lightning.config import PROMPT_FIELDS

# What marks a field in the template while the chat template renders it (characters no template or text uses)
_MARK = "\x00{}\x00"


@dataclass(frozen=True)
class PromptLayout:
    """A template cut at its fields: literal pieces (token ids) and field names, in order, and what goes before
    an answer."""

    pieces: tuple[tuple[int, ...] | str, ...]  # token ids of literal text, or the name of a field
    leads: dict[str, str]  # the space a field's text starts with (taken from the piece before it)
    answer_lead: str  # " " when the prompt ends in a word, so the answer is its next word; "" after a newline

    @classmethod
    def of(cls, tokenizer, template: str, chat_template: bool) -> PromptLayout:
        marked = template.format(**{name: _MARK.format(name) for name in PROMPT_FIELDS})
        if chat_template and getattr(tokenizer, "chat_template", None):
            marked = tokenizer.apply_chat_template(
                [{"role": "user", "content": marked}], add_generation_prompt=True, tokenize=False
            )
        parts = marked.split("\x00")  # literal, field, literal, field, ..., literal
        pieces: list[tuple[int, ...] | str] = []
        leads: dict[str, str] = {}
        for i, part in enumerate(parts):
            if i % 2:
                pieces.append(part)
                continue
            literal = part
            if i + 1 < len(parts) and literal.endswith(" "):
                literal, leads[parts[i + 1]] = literal[:-1], " "
            if literal:
                pieces.append(tuple(tokenizer(literal, add_special_tokens=False)["input_ids"]))
        return cls(tuple(pieces), leads, "" if parts[-1][-1:].isspace() else " ")

    def literal_length(self) -> int:
        """Tokens of the template's literal pieces."""
        return sum(len(piece) for piece in self.pieces if isinstance(piece, tuple))

    def prompts(
        self,
        tokenizer,
        questions: list[str],
        passages: list[tuple[str, str]],
        max_tokens: int,
        max_question_tokens: int,
    ) -> list[list[int]]:
        """The prompt of every (question, passage) pair, question by question: passages holds the (title, text) of
        len(passages) // len(questions) passages per question. Each prompt is at most max_tokens long (or the
        template and question alone when longer), its question at most max_question_tokens."""
        n = len(passages) // len(questions)
        question_ids = self._tokenize(tokenizer, "question", questions)
        question_ids = [ids[:max_question_tokens] for ids in question_ids]
        titles = self._tokenize(tokenizer, "title", [title for title, _ in passages])
        texts = self._tokenize(tokenizer, "text", [text for _, text in passages])
        prompts = []
        for row in range(len(passages)):
            fields = {"question": question_ids[row // n], "title": titles[row], "text": texts[row]}
            room = max_tokens - self.literal_length() - len(fields["question"]) - len(fields["title"])
            fields["text"] = fields["text"][: max(room, 0)]
            prompts.append([token for piece in self.pieces for token in self._ids(piece, fields)])
        return prompts

    def _tokenize(self, tokenizer, name: str, texts: list[str]) -> list[list[int]]:
        if name not in self.pieces:
            return [[] for _ in texts]
        lead = self.leads.get(name, "")
        return tokenizer([lead + text for text in texts], add_special_tokens=False)["input_ids"]

    @staticmethod
    def _ids(piece: tuple[int, ...] | str, fields: dict[str, list[int]]) -> list[int] | tuple[int, ...]:
        return fields[piece] if isinstance(piece, str) else piece
