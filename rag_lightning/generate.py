"""Answer questions with a checkpoint: `python -m rag_lightning.generate ckpt_path=... question="..."`.

`questions=FILE` answers a file of questions instead: one a line, or JSONL rows with a
"question". Each answer is printed with its retrieved passages and their scores;
`output=FILE` also writes them as JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path

from rag_lightning.command import command
from rag_lightning.config import GenerateConfig
from rag_lightning.data.datamodule import question_batch, tokenize_questions
from rag_lightning.errors import UserError
from rag_lightning.model.trained_model import load_trained_model, serving
from rag_lightning.text_files import jsonl_rows, read_utf8, utf8_lines
from retrieval_workers import atomic_write_bytes


def read_questions(path: str) -> list[str]:
    """The questions of a file: one a line (blank lines skipped), or a "question" per JSONL row."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"questions: file not found: {path}")
    if file.suffix != ".jsonl":
        questions = [line.strip() for line in read_utf8(file).splitlines() if line.strip()]
    else:
        questions = []
        for number, row in jsonl_rows(file, utf8_lines(file)):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
                raise UserError(f"{file}:{number}: needs a non-empty string 'question'")
            questions.append(row["question"].strip())
    if not questions:
        raise UserError(f"{file}: no questions")
    return questions


def generate(cfg: GenerateConfig) -> list[dict]:
    """Each question's answer and retrieved passages (id, title, text, score), best first."""
    questions = [cfg.question] if cfg.question is not None else read_questions(str(cfg.questions))
    if not all(q.strip() for q in questions):
        raise UserError("question: empty")
    trained = load_trained_model(cfg.ckpt_path)
    module = trained.module
    answered = []
    with serving(trained, cfg.service):
        for start in range(0, len(questions), cfg.batch_size):
            chunk = questions[start : start + cfg.batch_size]
            batch = question_batch(
                chunk,
                *tokenize_questions(
                    chunk, module.question_tokenizer, module.generator_tokenizer, module.model_cfg.max_question_tokens
                ),
                module.question_tokenizer.pad_token_id,
            )
            answers, retrieved = module.predict_answers(batch)
            ids, scores = retrieved.ids[:, : module.n_docs], retrieved.scores.float().numpy()
            for i, (question, answer) in enumerate(zip(chunk, answers)):
                passages = module.passages.titles_and_texts(ids[i])
                answered.append(
                    {
                        "question": question,
                        "answer": answer,
                        "retrieved": [
                            {"id": int(ids[i, j]), "title": title, "text": text, "score": float(scores[i, j])}
                            for j, (title, text) in enumerate(passages)
                        ],
                    }
                )
    for record in answered:
        print(f"\nquestion: {record['question']}\nanswer:   {record['answer']}")
        for rank, passage in enumerate(record["retrieved"], 1):
            print(f"  {rank}. [{passage['score']:.4f}] {passage['title']}: {passage['text']}")
    if cfg.output:
        atomic_write_bytes(cfg.output, "".join(json.dumps(r) + "\n" for r in answered).encode())
    return answered


main = command("generate")(generate)  # python -m rag_lightning.generate, or rag-generate


if __name__ == "__main__":
    main()
