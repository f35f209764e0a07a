"""LoRA through peft (rag_lightning/model/lora.py), on tiny random models built here: only the adapters train, a
misnamed target layer is refused in one line, a checkpoint holds the adapters alone and loads back exactly, the
merged export is a plain model giving the same logits, and gradient checkpointing changes nothing computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

from rag_lightning.errors import UserError
from rag_lightning.model.lora import check_lora_targets, merged, with_frozen, with_lora, without_frozen

from helpers import tiny_causal_lm_config

TARGETS = ["q_proj", "v_proj"]
ADAPTER_WEIGHTS = 2 * len(TARGETS) * 2  # 2 layers, each target layer with its lora_A and lora_B


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """A tiny random Llama-style causal LM, written as a pretrained folder."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(tiny_causal_lm_config("llama", 64)).save_pretrained(folder)
    return folder


def tiny_gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(tiny_causal_lm_config("gpt2", 64))


def lora_model(folder: Path, seed: int = 1) -> PeftModel:
    """The folder's model with LoRA on q_proj and v_proj, no dropout; seed sets the adapters' initial weights."""
    torch.manual_seed(seed)
    return with_lora(AutoModelForCausalLM.from_pretrained(folder), 4, 8.0, 0.0, TARGETS)


def tokens(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 3) -> torch.optim.Optimizer:
    """A few AdamW steps on a toy loss (the LM loss of random tokens), over the parameters that require grad."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return optimizer


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens(3)).logits


def test_only_the_adapters_train(llama_folder):
    model = lora_model(llama_folder)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == ADAPTER_WEIGHTS and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    optimizer = train_steps(model)

    after = dict(model.named_parameters())
    assert all(not torch.equal(before[name], after[name]) for name in trainable)
    assert all(torch.equal(before[name], p) for name, p in after.items() if name not in trainable)
    assert set(optimizer.state) == {after[name] for name in trainable}


def test_target_names_are_checked_against_the_model(llama_folder):
    llama = AutoModelForCausalLM.from_pretrained(llama_folder)
    check_lora_targets(llama, ["q_proj", "model.layers.0.mlp.down_proj"], "lora.target_modules")
    with pytest.raises(UserError) as error:
        check_lora_targets(llama, ["q_proj", "c_attn", "self_attn"], "model.generator.lora.target_modules")
    assert str(error.value) == (
        "model.generator.lora.target_modules: c_attn, self_attn match no layer of the LlamaForCausalLM; its linear "
        "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
    with pytest.raises(UserError, match="^lora: lists no layer"):
        check_lora_targets(llama, [], "lora")

    with torch.device("meta"):  # a skeleton, as the pre-flight check builds it: names without weights
        gpt2 = tiny_gpt2()
    check_lora_targets(gpt2, ["c_attn"], "lora.target_modules")
    with pytest.raises(UserError) as error:
        check_lora_targets(gpt2, TARGETS, "lora.target_modules")
    assert str(error.value) == (
        "lora.target_modules: q_proj, v_proj match no layer of the GPT2LMHeadModel; its linear layers: "
        "c_attn, c_fc, c_proj, lm_head"
    )


def test_with_lora_refuses_missing_targets_before_changing_the_model(llama_folder):
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    with pytest.raises(UserError, match="^lora.target_modules: qkv matches no layer of the LlamaForCausalLM;"):
        with_lora(model, 4, 8.0, 0.0, ["q_proj", "qkv"], key="lora.target_modules")
    assert all(p.requires_grad for p in model.parameters()) and not any(
        ".lora_" in n for n, _ in model.named_parameters()
    )


def test_gpt2_adapters_sit_on_its_conv1d_layers():
    model = with_lora(tiny_gpt2(), 4, 8.0, 0.0, ["c_attn"])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"
    ]
    train_steps(model, steps=1)


class Holder(nn.Module):
    """Stands for the LightningModule: the PeftModel is one of its parts, under the key prefix "rag.generator"."""

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.rag = nn.Module()
        self.rag.generator = generator
        self.head = nn.Linear(4, 2)  # another trainable part
        self.fixed = nn.Linear(4, 2).requires_grad_(False)  # a frozen part not made from a folder


def test_a_checkpoint_holds_the_adapters_alone_and_loads_back(llama_folder, tmp_path):
    trained = Holder(lora_model(llama_folder))
    train_steps(trained.rag.generator)
    checkpoint = without_frozen(trained.state_dict(), trained.rag.generator, "rag.generator")
    adapters = sorted(
        f"rag.generator.{name}" for name, p in trained.rag.generator.named_parameters() if p.requires_grad
    )
    assert sorted(checkpoint) == sorted([*adapters, "head.weight", "head.bias", "fixed.weight", "fixed.bias"])
    assert len(adapters) == ADAPTER_WEIGHTS
    torch.save({"state_dict": checkpoint}, tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]

    fresh = Holder(lora_model(llama_folder, seed=5))  # other adapter weights, the same base
    assert not torch.equal(logits(fresh.rag.generator), logits(trained.rag.generator))
    fresh.load_state_dict(with_frozen(saved, fresh.rag.generator, "rag.generator"))  # strict
    assert torch.equal(logits(fresh.rag.generator), logits(trained.rag.generator))
    assert torch.equal(fresh.head.weight, trained.head.weight) and torch.equal(fresh.fixed.bias, trained.fixed.bias)

    lacking = {k: v for k, v in saved.items() if "layers.1.self_attn.v_proj.lora_B" not in k}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*layers\.1\.self_attn\.v_proj\.lora_B"):
        fresh.load_state_dict(with_frozen(lacking, fresh.rag.generator, "rag.generator"))


def test_a_full_checkpoint_still_loads(llama_folder):
    trained = lora_model(llama_folder)
    train_steps(trained)
    fresh = lora_model(llama_folder, seed=5)
    fresh.load_state_dict(with_frozen(trained.state_dict(), fresh))
    assert torch.equal(logits(fresh), logits(trained))


def test_merged_model_exports_as_a_plain_model(llama_folder, tmp_path):
    model = lora_model(llama_folder)
    train_steps(model)
    expected = logits(model)

    merged(model).save_pretrained(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")

    assert type(exported) is LlamaForCausalLM
    assert torch.allclose(logits(exported), expected, atol=1e-5)
    assert isinstance(model, PeftModel) and torch.equal(logits(model), expected)  # the adapters are still there
    assert len([name for name, _ in model.named_parameters() if ".lora_" in name]) == ADAPTER_WEIGHTS


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_computes_the_same_loss_and_adapter_gradients(llama_folder):
    def loss_and_gradients(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model = lora_model(llama_folder)
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # B starts at zero: give the A weights a gradient too
                nn.init.normal_(p)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        q_proj_runs = []
        model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
            lambda *_: q_proj_runs.append(1)
        )
        ids = tokens()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        return loss, gradients, len(q_proj_runs)

    loss, gradients, runs = loss_and_gradients(checkpointing=False)
    checkpointed_loss, checkpointed_gradients, checkpointed_runs = loss_and_gradients(checkpointing=True)

    assert (runs, checkpointed_runs) == (1, 2)  # checkpointing ran the layer again in the backward pass
    assert torch.equal(checkpointed_loss, loss)
    assert len(gradients) == ADAPTER_WEIGHTS and all(g is not None and g.abs().sum() > 0 for g in gradients.values())
    assert all(torch.allclose(checkpointed_gradients[name], g, atol=1e-7) for name, g in gradients.items())
